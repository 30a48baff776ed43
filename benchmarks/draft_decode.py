"""JPEG draft-mode decoding (`extract --draft`): what it saves and what it changes in the features.

Draft mode asks libjpeg to decode at 1/2, 1/4 or 1/8 scale (DCT-domain) while keeping the short side
>= 256, so Resize(256) starts from a smaller image. It only pays for photos whose short side is at
least 512 pixels. This script times decode + eval transform on one core with and without it, counts
the images it touches, and compares the features of two extractions (cosine similarity, relative L2).

    python benchmarks/draft_decode.py [--data DIR] [--weights imagenet|none]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import read_cache  # noqa: E402
from pipeline.backbones import imagenet_weights_path  # noqa: E402
from pipeline.data import eval_transform, load_rgb, scan_dataset  # noqa: E402
from pipeline.extract import ExtractConfig, extract  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/datasets/hymenoptera_data"


def decode_seconds(files: list[Path], draft) -> float:
    tf = eval_transform()
    t0 = time.perf_counter()
    for f in files:
        tf(load_rgb(f, draft=draft))
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--weights", default=None)
    args = ap.parse_args(argv)
    weights = args.weights or ("imagenet" if imagenet_weights_path("resnet18").is_file() else "none")
    ds = scan_dataset(args.data, ["train", "val"])
    files = [args.data / p for sp in ds.splits.values() for p in sp.paths]
    touched = sum(1 for f in files if min(Image.open(f).size) >= 512)
    full, draft = decode_seconds(files, None), decode_seconds(files, (256, 256))
    with tempfile.TemporaryDirectory() as tmp:
        for name, flag in (("full", False), ("draft", True)):
            extract(ExtractConfig(str(args.data), f"{tmp}/{name}.h5", weights=weights, draft=flag))
        a, b = read_cache(f"{tmp}/full.h5"), read_cache(f"{tmp}/draft.h5")
    fa = np.concatenate([a.splits[s].features for s in a.splits])
    fb = np.concatenate([b.splits[s].features for s in b.splits])
    cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
    rel = np.linalg.norm(fa - fb, axis=1) / np.linalg.norm(fa, axis=1)
    changed = rel > 1e-6
    print(f"{len(files)} images, {touched} with a short side >= 512 px (the only ones draft mode changes); "
          f"weights {weights}")
    print("\n| decode + eval transform, one core | seconds | images/s |\n|---|---:|---:|")
    print(f"| full decode | {full:.2f} | {len(files) / full:.0f} |")
    print(f"| draft decode | {draft:.2f} | {len(files) / draft:.0f} |")
    print(f"\nfeatures changed for {int(changed.sum())} images; over those: cosine similarity min "
          f"{cos[changed].min() if changed.any() else 1:.4f} mean {cos[changed].mean() if changed.any() else 1:.4f}, "
          f"relative L2 max {rel.max():.4f} mean {rel[changed].mean() if changed.any() else 0:.4f}")


if __name__ == "__main__":
    main()
