"""Finetune speed per epoch: the tutorial's fine-tuning recipe vs `finetune`, same data, device, call.

Both train every weight of ResNet-18 with SGD lr 0.001 momentum 0.9, StepLR 7/0.1, batch 4, a train
and a val phase per epoch, random init (timing does not depend on the weights). The tutorial's code
path: ImageFolder + DataLoader(num_workers=4) re-created per epoch, fp32, .item()-free loop as written.
Ours: persistent workers (one per core), pinned memory, channels_last, bf16 autocast on CUDA.

    python benchmarks/finetune_vs_seed.py [--epochs 2] [--device auto]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.finetune import FinetuneConfig, finetune  # noqa: E402
from pipeline.runtime import resolve_device  # noqa: E402
from tutorial_recipe import tutorial_epochs  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/datasets/hymenoptera_data"

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    seed = tutorial_epochs(args.data, args.epochs, device, workers=4)
    with tempfile.TemporaryDirectory() as tmp:
        m = finetune(FinetuneConfig(str(args.data), f"{tmp}/ft", weights="none", epochs=args.epochs,
                                    device=args.device, precision=args.precision, plots=False))
    ours = [h["seconds"] for h in m["history"]]
    s_mean, o_mean = sum(seed) / len(seed), sum(ours) / len(ours)
    print(f"device {device}, {args.epochs} epochs each, precision {m['precision']}")
    print("\n| recipe | s per epoch (mean) | epochs timed | 25-epoch estimate s |\n|---|---:|---:|---:|")
    print(f"| tutorial finetune | {s_mean:.2f} | {len(seed)} | {25 * s_mean:.1f} |")
    print(f"| tlearn finetune | {o_mean:.2f} | {len(ours)} | {25 * o_mean:.1f} |")
    print(f"\nspeed-up per epoch: {s_mean / o_mean:.2f}x")
    return {"seed": seed, "ours": ours, "ratio": s_mean / o_mean}

if __name__ == "__main__":
    main()
