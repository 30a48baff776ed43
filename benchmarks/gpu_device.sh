#!/usr/bin/env bash
# Every pair of issue 9 in one run on the GPU machine (one H200 via the `device` tool), process walls
# included; prints a table, then each goal's ratio and met / not met (also in $OUT/gpu.log, $OUT/table.md
# and $OUT/goals.txt). Run benchmarks/gpu_first_checks.sh first: correct before fast.
#   here:   mkdir -p .data && cp -r ../shared/datasets/hymenoptera_data .data/ && echo /.data/ >> .git/info/exclude
#   device: run(command="bash benchmarks/gpu_device.sh .data/hymenoptera_data", carry=[".data"], timeout_s=590)
#   check without a GPU:  bash benchmarks/gpu_device.sh --dry-run [DATA]    print every step's command
#                         bash benchmarks/gpu_device.sh --cpu-small [DATA]  run every step on the CPU, tiny sizes
# Knobs (env): COPIES (hard-linked copies of the data for extraction at scale, 51 -> 20,247 images; copied
# where the work folder is on another filesystem), EPOCHS (25), ONLY (a regex of step names to run),
# T_<step> (a step's timeout in seconds, e.g. T_extract_default_flags=400).
set -uo pipefail
MODE=gpu
case "${1:-}" in --dry-run) MODE=dry; shift ;; --cpu-small) MODE=cpu; shift ;; esac
DATA=${1:-.data/hymenoptera_data}
OUTDIR=${OUT:-/tmp/tlearn_bench}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu.log ROWS=$OUTDIR/rows.tsv
: >"$LOG"; : >"$ROWS"
WORK=$(mktemp -d /tmp/tlearn_gpu.XXXXXX)
export PYTHONUNBUFFERED=1 TLEARN_OFFLINE=1
py=${PYTHON:-python3}
if [ "$MODE" != cpu ]; then
  DEV=cuda COPIES=${COPIES:-51} EPOCHS=${EPOCHS:-25} PER_CLASS=0 BS=256 W16=16
else  # a few images, one epoch: proves every step runs and parses, measures nothing
  DEV=cpu COPIES=${COPIES:-3} EPOCHS=${EPOCHS:-1} PER_CLASS=3 BS=8 W16=2
fi

# step NAME TIMEOUT CMD...: run CMD, log its output, record its process wall and its key line
step() {
  local name=$1 limit=$2 knob="T_$1"; shift 2
  limit=${!knob:-$limit}
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then return; fi
  echo "== $name: $*" | tee -a "$LOG"
  if [ "$MODE" = dry ]; then printf '%s\t-\t(dry run)\n' "$name" >>"$ROWS"; return; fi
  local t0 t1 rc out
  t0=$(date +%s%N)
  out=$(timeout "$limit" "$@" 2>&1 | grep -v -e Warning -e warnings.warn); rc=${PIPESTATUS[0]}
  t1=$(date +%s%N)
  echo "$out" | tee -a "$LOG" >/dev/null; echo "$out" | tail -n 15
  echo "$out" >"$OUTDIR/step_$name.out"
  local key
  key=$(echo "$out" | grep -E "images/s|speed-up|in its loop|epoch|max \|diff\||pure forward|ceiling| init " | tail -n 3 | tr '\n' ' ' | tr '\t' ' ' | cut -c1-230)
  [ "$rc" = 0 ] || key="FAILED rc=$rc ${key}"
  printf '%s\t%s\t%s\n' "$name" "$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.1f", (b-a)/1e9}')" "$key" >>"$ROWS"
}

# the data: a small copy for --cpu-small; COPIES hard-linked copies of every image for extraction at scale
[ "$MODE" = dry ] || $py - "$DATA" "$WORK" "$COPIES" "$PER_CLASS" <<'PYEOF'
import os, shutil, sys
from pathlib import Path
src, work, copies, per_class = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if not (src / "train").is_dir():
    sys.exit(f"no dataset at {src}")
small, big = work / "data", work / "big"


def link(src, dst):
    try:
        os.link(src, dst)
    except OSError:  # another filesystem (EXDEV) or no hard links there: a copy
        shutil.copy2(src, dst)


for split in ("train", "val"):
    for cls in sorted(p.name for p in (src / split).iterdir() if p.is_dir()):
        files = sorted(f for f in (src / split / cls).iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if per_class:
            files = files[:per_class]
        for d in (small / split / cls, big / split / cls):
            d.mkdir(parents=True, exist_ok=True)
        for f in files:
            link(f, small / split / cls / f.name)
            for k in range(copies):
                link(f, big / split / cls / f"c{k:03d}_{f.name}")
n = sum(1 for _ in big.rglob("*.*"))
print(f"data: {small} (the tutorial's folder), {big} ({n} images: {copies} copies, hard-linked where possible)")
PYEOF
SMALL=$WORK/data BIG=$WORK/big
if [ "$MODE" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$LOG"
fi
$py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$LOG"
# a bare interpreter with torch + CUDA init: the start-up both sides of every pair pay
step startup_torch_cuda 120 $py -c "import time; t=time.perf_counter(); import torch, torchvision; torch.zeros(1, device='$DEV'); print(f'import + {\"$DEV\"} init {time.perf_counter()-t:.1f} s')"

# 1. the forward ceiling (in-memory batch, channels_last) and extraction at scale, per decoder
for p in bf16 fp32; do
  [ "$MODE" = cpu ] && [ $p = bf16 ] && continue
  step "ceiling_$p" 150 $py benchmarks/extract_ceiling.py --data "$SMALL" --device $DEV --precision $p --batch-size $BS --workers $W16 --rounds 1
done
# the true default flags (batch, workers, decoder, precision): what a user gets
step extract_default_flags 240 $py cli.py extract "$BIG" --cache "$WORK/auto.h5" --weights none
step extract_pil_workers16 240 $py cli.py extract "$BIG" --cache "$WORK/pil.h5" --weights none --batch-size $BS --decoder pil --workers $W16
step extract_torchvision 240 $py cli.py extract "$BIG" --cache "$WORK/tv.h5" --weights none --batch-size $BS --decoder torchvision
step features_tv_vs_pil 60 $py -c "
import numpy as np; from cache import read_cache
a, b = read_cache('$WORK/pil.h5'), read_cache('$WORK/tv.h5')
for s in a.splits:
    fa, fb = a.splits[s].features, b.splits[s].features
    rel = np.linalg.norm(fa - fb, axis=1) / np.maximum(np.linalg.norm(fa, axis=1), 1e-12)
    print(f'{s}: torchvision vs pil decoder, max relative L2 {rel.max():.2e} (max |diff| {np.abs(fa - fb).max():.2e})')"

# 2. frozen mode: the tutorial's recipe vs `cli.py run` (extract + 25-epoch head), each its own process
step tutorial_frozen 400 $py benchmarks/tutorial_process.py "$SMALL" --frozen --epochs $EPOCHS --device $DEV
step tlearn_run_frozen 200 $py cli.py run "$SMALL" --out "$WORK/run" --weights none --epochs $EPOCHS
# predict on the device: probabilities and novelty (float64 on the GPU) for every val photo, as JSON
step predict_novelty 200 bash -c "$py cli.py predict $WORK/run $SMALL/val --device $DEV --json | $py -c \"import json, sys; r = json.load(sys.stdin); n = sum('novelty' in p for p in r); u = sum(bool(p.get('unknown')) for p in r); print(f'{len(r)} photos, {n} with novelty, {u} unknown')\""

# 3. finetune, the same recipe: the tutorial's loop vs `cli.py finetune` (bf16 and fp32)
step tutorial_finetune 400 $py benchmarks/tutorial_process.py "$SMALL" --epochs $EPOCHS --device $DEV
for p in bf16 fp32; do
  [ "$MODE" = cpu ] && [ $p = bf16 ] && continue
  step "tlearn_finetune_$p" 400 $py cli.py finetune "$SMALL" --out "$WORK/ft_$p" --weights none --epochs $EPOCHS --precision $p --no-plots
done

# 4. features vs sharding: 2 processes on one device vs 1, fp32 (bit for bit on the CPU; a tolerance on CUDA)
step torchrun_2_vs_1 200 bash -c "$py -m torch.distributed.run --standalone --nproc-per-node 2 cli.py extract $SMALL --cache $WORK/two.h5 --weights none --precision fp32 --device $DEV --decoder pil >/dev/null && \
  $py cli.py extract $SMALL --cache $WORK/one.h5 --weights none --precision fp32 --device $DEV --decoder pil --batch-size 7 >/dev/null && \
  $py -c \"import numpy as np; from cache import read_cache as r; a,b=r('$WORK/two.h5'),r('$WORK/one.h5'); print('max |diff| two processes vs one (other batch size):', max(float(np.abs(a.splits[s].features-b.splits[s].features).max()) for s in a.splits), 'paths equal:', all(a.splits[s].paths==b.splits[s].paths for s in a.splits))\""

# the table
{
  echo; echo "| step | process wall s | key figures |"; echo "|---|---:|---|"
  while IFS=$'\t' read -r name wall key; do echo "| $name | $wall | ${key//|/\\|} |"; done <"$ROWS"
} | tee "$OUTDIR/table.md" | tee -a "$LOG"
[ "$MODE" = dry ] || $py benchmarks/gpu_goals.py "$OUTDIR" "$BIG" | tee "$OUTDIR/goals.txt" | tee -a "$LOG"
rm -rf "$WORK"
