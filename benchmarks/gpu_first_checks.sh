#!/usr/bin/env bash
# The first, short run on a GPU machine (under 5 minutes on one H200, torch preinstalled, no internet):
# is the device decode path right before it is fast? Run it before benchmarks/gpu_device.sh.
#   device: run(command="bash benchmarks/gpu_first_checks.sh", timeout_s=330)
#   here:   bash benchmarks/gpu_first_checks.sh --cpu   (every check on the CPU, tiny sizes: proves the script)
# 1. odd JPEGs through the device path vs the PIL path: EXIF 6/8, CMYK, grayscale, progressive,
#    truncated, 1x1 (and what the raw nvJPEG decode makes of each);
# 2. the race test: one folder of photo-like JPEGs of many sizes extracted with a synchronize before
#    each decode and with the decode stream: identical features (and the old way, for the record);
# 3. torch.cuda.set_sync_debug_mode("warn") over 5 batches: every synchronizing call, counted;
# 4. per-stage times over 20 batches (each stage ended by a synchronize).
# Prints every CHECK line, then a summary (also in $OUT/first_checks.log); exit 1 when a check failed.
set -uo pipefail
DEV=cuda IMAGES=${IMAGES:-1024} BS=${BS:-256} W=${W:-8} SYNC_BATCHES=5 STAGE_BATCHES=20
if [ "${1:-}" = "--cpu" ]; then
  DEV=cpu IMAGES=12 BS=4 W=0 SYNC_BATCHES=2 STAGE_BATCHES=2
fi
OUTDIR=${OUT:-/tmp/tlearn_first_checks}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/first_checks.log
: >"$LOG"
export PYTHONUNBUFFERED=1 TLEARN_OFFLINE=1
py=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 1
if [ "$DEV" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
fi
$py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

failed=0
check() {  # check NAME LIMIT ARGS...: one python piece under a time limit; its CHECK lines are the result
  local name=$1 limit=$2; shift 2
  echo "== $name: device_checks.py $*" | tee -a "$LOG"
  local t0 rc
  t0=$(date +%s)
  timeout "$limit" $py benchmarks/device_checks.py "$@" --device "$DEV" >>"$LOG" 2>&1
  rc=$?
  echo "   ($name: rc=$rc, $(( $(date +%s) - t0 )) s)" | tee -a "$LOG"
  if [ "$rc" != 0 ]; then failed=1; echo "CHECK FAIL $name: rc=$rc (see $LOG)" >>"$LOG"; fi
}

check cases 45 cases
check race 110 race --images "$IMAGES" --batch-size "$BS" --workers "$W"
check syncs 80 syncs --batches "$SYNC_BATCHES" --batch-size "$BS" --workers "$W"
check stages 60 stages --batches "$STAGE_BATCHES" --batch-size "$BS" --workers "$W"

echo; echo "summary:"
grep '^CHECK' "$LOG" | tee "$OUTDIR/summary.txt"
grep -q '^CHECK FAIL' "$LOG" && failed=1
echo "first checks: $([ $failed = 0 ] && echo 'all passed' || echo 'SOME FAILED') (log: $LOG)"
exit $failed
