#!/usr/bin/env bash
# All GPU measurements in one prepared run, for the `device` tool (one H100, about 15 minutes a session).
#   here:   mkdir -p .data && cp -r ../shared/datasets/hymenoptera_data .data/ && echo /.data/ >> .git/info/exclude
#   device: run(command="bash benchmarks/gpu_device.sh .data/hymenoptera_data", carry=[".data"], timeout_s=540)
# Every pair (tutorial vs ours) runs in this one call on the same GPU; results land in $OUT/gpu.log.
set -uo pipefail
DATA=${1:-.data/hymenoptera_data}
LOG=${OUT:-/tmp}/gpu.log
export PYTHONUNBUFFERED=1 TLEARN_OFFLINE=1
py=python3
run() { echo "== $*" | tee -a "$LOG"; timeout "${T:-150}" "$@" 2>&1 | grep -v Warning | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOG"
$py -c "import torch; print('torch', torch.__version__)" | tee -a "$LOG"
# 1. extraction vs the pure-forward ceiling, per precision (channels_last), batch 256
for p in bf16 fp16 fp32; do T=90 run $py benchmarks/extract_ceiling.py --data "$DATA" --device cuda --precision $p --batch-size 256 --workers 16 --rounds 2; done
# 1b. JPEGs decoded on the GPU (nvJPEG) instead of by PIL in the workers
T=90 run $py benchmarks/extract_ceiling.py --data "$DATA" --device cuda --precision bf16 --batch-size 256 --workers 16 --rounds 2 --decoder torchvision
# 2. frozen two-stage vs the tutorial's frozen recipe (2 epochs timed, 25 estimated), same GPU
T=120 run $py benchmarks/frozen_vs_seed.py --data "$DATA" --device cuda --precision bf16 --seed-epochs 2
# 3. finetune 25 epochs: tutorial recipe vs ours, same GPU (issue 3's table); bf16 and fp32 (batch 4 is
#    launch-bound, so autocast's casts may cost more than bf16 saves: measure both)
T=200 run $py benchmarks/finetune_vs_seed.py --data "$DATA" --device cuda --epochs 25 --precision bf16
T=200 run $py benchmarks/finetune_vs_seed.py --data "$DATA" --device cuda --epochs 25 --precision fp32
# 4. sharded extraction with 2 processes on one GPU: equal to one process?
T=90 run bash -c "$py -m torch.distributed.run --standalone --nproc-per-node 2 cli.py extract $DATA --cache /tmp/two.h5 --weights none --precision fp32 && \
  $py cli.py extract $DATA --cache /tmp/one.h5 --weights none --precision fp32 && \
  $py -c \"import numpy as np; from cache import read_cache as r; a,b=r('/tmp/two.h5'),r('/tmp/one.h5'); print('max |diff| two vs one process:', max(float(np.abs(a.splits[s].features-b.splits[s].features).max()) for s in a.splits), 'paths equal:', all(a.splits[s].paths==b.splits[s].paths for s in a.splits))\""
