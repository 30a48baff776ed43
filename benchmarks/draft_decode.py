"""JPEG draft-mode decoding (`extract --jpeg-decode draft|fast`): what it saves and what it changes.

Draft mode asks libjpeg to decode at 1/2, 1/4 or 1/8 scale (DCT-domain) while keeping the short side
>= 256 (draft, the old --draft) or >= 512 (fast, the default), so Resize(256) starts from a smaller
image. It only pays for photos whose short side is at least 512 (draft) or 1024 (fast) pixels. This
script times decode + eval transform on one core for the three modes, counts the images each touches,
and compares the features of the extractions with the full-size decode's (cosine similarity, relative
L2). benchmarks/phone_photos.py measures the same on 12 MP photos, beside a plain torchvision loop.

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
from pipeline.preprocess import JPEG_DECODES, Preprocess  # noqa: E402

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
    short = [min(Image.open(f).size) for f in files]
    print(f"{len(files)} images; weights {weights}")
    print("\n| decode + eval transform, one core | seconds | images/s |\n|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        extract(ExtractConfig(str(args.data), f"{tmp}/exact.h5", weights=weights, jpeg_decode="exact"))
        fa = _features(f"{tmp}/exact.h5")
        rows = []
        for mode in ("exact", "fast", "draft"):
            spec = Preprocess(draft=JPEG_DECODES[mode])
            secs = decode_seconds(files, spec.draft_size())
            print(f"| {mode} | {secs:.2f} | {len(files) / secs:.0f} |")
            if mode != "exact":
                extract(ExtractConfig(str(args.data), f"{tmp}/{mode}.h5", weights=weights, jpeg_decode=mode))
                touched = sum(1 for s in short if s >= 2 * spec.draft * spec.resize)
                rows.append((mode, touched, _features(f"{tmp}/{mode}.h5")))
    for mode, touched, fb in rows:
        cos = (fa * fb).sum(1) / (np.linalg.norm(fa, axis=1) * np.linalg.norm(fb, axis=1))
        rel = np.linalg.norm(fa - fb, axis=1) / np.linalg.norm(fa, axis=1)
        changed = rel > 1e-6
        print(f"\n{mode}: {touched} images decoded at a reduced scale, features changed for {int(changed.sum())}; "
              f"cosine similarity min {cos.min():.4f}, relative L2 max {rel.max():.4f} "
              f"mean over changed {rel[changed].mean() if changed.any() else 0:.4f}")


def _features(path) -> np.ndarray:
    c = read_cache(path)
    return np.concatenate([c.splits[s].features for s in c.splits])


if __name__ == "__main__":
    main()
