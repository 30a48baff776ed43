"""Cached augmentation: val accuracy of train-head with and without --views, over several seeds.

Extracts the real data once with K views per train image (and times extraction with and without
views), then trains heads for seeds 0..S-1 with the cached views and without (eval features only),
all seeds of one mode as one batched sweep. One val image is 0.65 points of accuracy, so single runs
do not tell; the mean and spread over seeds do.

    python benchmarks/views_accuracy.py [--data DIR] [--views 4] [--seeds 10] [--weights imagenet|none]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import read_cache  # noqa: E402
from pipeline.backbones import imagenet_weights_path  # noqa: E402
from pipeline.extract import ExtractConfig, extract  # noqa: E402
from pipeline.head import expand_grid, train_heads  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/datasets/hymenoptera_data"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--weights", default=None, help="default: imagenet when cached, else none")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args(argv)
    weights = args.weights or ("imagenet" if imagenet_weights_path("resnet18").is_file() else "none")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        extract(ExtractConfig(str(args.data), f"{tmp}/plain.h5", weights=weights, precision=args.precision))
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        extract(ExtractConfig(str(args.data), f"{tmp}/views.h5", weights=weights, views=args.views,
                              precision=args.precision))
        t_views = time.perf_counter() - t0
        c = read_cache(f"{tmp}/views.h5")
    tr, va = c.splits["train"], c.splits["val"]
    grid = expand_grid({"seed": list(range(args.seeds))})
    rows = {}
    for name, views in (("eval features only", None), (f"{args.views} cached views", tr.views)):
        res, sec = train_heads((tr.features, tr.labels), (va.features, va.labels), len(c.class_names), grid,
                               views=views)
        accs = [r.best_val_acc for r in res]
        rows[name] = (statistics.mean(accs), statistics.pstdev(accs), min(accs), max(accs), sec)
    print(f"weights {weights}, {args.seeds} seeds, 25 epochs each, val {len(va.labels)} images")
    print("\n| train-head on | mean best val acc | std | min | max | train-head s (all seeds) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (m, sd, lo, hi, sec) in rows.items():
        print(f"| {name} | {m:.4f} | {sd:.4f} | {lo:.4f} | {hi:.4f} | {sec:.2f} |")
    print(f"\nextract without views {t_plain:.1f} s, with {args.views} views {t_views:.1f} s")
    return {"rows": rows, "t_plain": t_plain, "t_views": t_views}


if __name__ == "__main__":
    main()
