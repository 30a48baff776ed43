"""Frozen two-stage path (extract + 25-epoch train-head) vs the tutorial's frozen recipe, side by side.

The tutorial's "ConvNet as fixed feature extractor" pushes every image through the frozen ResNet-18
in every batch of every epoch (train phase with RandomResizedCrop + flip, then a val phase). We time
its epochs (1 by default; the 25-epoch figure is an estimate from the measured mean) and then our
extract + train-head on the same data, machine and threads, in this one process.

    python benchmarks/frozen_vs_seed.py [--data DIR] [--seed-epochs 1] [--precision fp32]

Weights: ImageNet when they are in the torch cache, else random init (timing does not depend on them).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.backbones import imagenet_weights_path  # noqa: E402
from pipeline.extract import ExtractConfig, extract  # noqa: E402
from pipeline.runtime import resolve_device  # noqa: E402
from pipeline.train_head import HeadConfig, run_train_head  # noqa: E402
from tutorial_recipe import tutorial_epochs  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/datasets/hymenoptera_data"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seed-epochs", type=int, default=1, help="tutorial epochs to time (25-epoch figure = mean x 25)")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers for both (default: ours)")
    ap.add_argument("--views", type=int, default=0)
    args = ap.parse_args(argv)
    if not (args.data / "train").is_dir():
        sys.exit(f"dataset not found at {args.data}; pass --data")
    device = resolve_device(args.device)
    wfile = imagenet_weights_path("resnet18")
    weights = "imagenet" if wfile.is_file() else "none"
    ecfg_workers = args.workers if args.workers is not None else ExtractConfig("", "").workers
    print(f"device {device}, torch threads {torch.get_num_threads()}, workers {ecfg_workers}, weights {weights}, "
          f"precision {args.precision}", flush=True)

    seed_times = tutorial_epochs(args.data, args.seed_epochs, device, ecfg_workers, frozen=True,
                                 weights_file=wfile if weights == "imagenet" else None)
    seed_epoch = sum(seed_times) / len(seed_times)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        s = extract(ExtractConfig(str(args.data), f"{tmp}/f.h5", weights=weights, device=args.device,
                                  precision=args.precision, workers=ecfg_workers, views=args.views))
        t_extract = time.perf_counter() - t0
        t1 = time.perf_counter()
        m = run_train_head(HeadConfig(f"{tmp}/f.h5", f"{tmp}/run", plots=False))
        t_head = time.perf_counter() - t1
    ours = t_extract + t_head
    seed_25 = 25 * seed_epoch
    rows = [
        ("tutorial frozen recipe, 1 epoch (measured)", seed_epoch),
        ("tutorial frozen recipe, 25 epochs (estimate)", seed_25),
        (f"extract ({sum(s['rows'].values())} images, {s['images_per_s']:.1f} images/s)", t_extract),
        (f"train-head, 25 epochs (in-process training {m['seconds']:.3f} s)", t_head),
        ("extract + train-head", ours),
    ]
    print("\n| step | seconds |\n|---|---:|")
    for name, sec in rows:
        print(f"| {name} | {sec:.2f} |")
    print(f"\nspeed-up of extract + train-head over the tutorial's 25 epochs: {seed_25 / ours:.1f}x "
          f"(best val acc {m['best_val_acc']:.4f})")
    return {"seed_epoch": seed_epoch, "extract": t_extract, "head": t_head, "ratio": seed_25 / ours}


if __name__ == "__main__":
    main()
