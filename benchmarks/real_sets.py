"""Real image sets that installed packages ship (no network), written as flat folders of class folders
that the tool splits itself (`extract DATA --val-fraction 0.2`).

- digits: scikit-learn's 1,797 real 8 x 8 scans of handwritten digits (UCI optdigits, 16 grey levels),
  10 classes of 174-183. Written as SIZE x SIZE greyscale PNGs, dark ink on white paper as scanned,
  upscaled bilinearly (the tool then resizes to 256 and crops 224, as for any photo).

    python benchmarks/real_sets.py digits OUT_DIR [--size 32]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np

DIGITS_COUNT = 1797


def _complete(root: Path, classes: list[str], count: int, ext: str) -> bool:
    """root already holds exactly this set (what a finished earlier write left)."""
    if not root.is_dir() or sorted(p.name for p in root.iterdir()) != sorted(classes):
        return False
    return sum(len(list((root / c).glob(f"*{ext}"))) for c in classes) == count


def write_digits(root: str | os.PathLike, size: int = 32) -> Path:
    """scikit-learn's digits as root/<digit>/<digit>_<index>.png (index in load_digits' order). Reuses a
    finished earlier write; refuses a root that exists with anything else in it (never overwrites)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = Path(root).expanduser()
    classes = [str(d) for d in range(10)]
    if _complete(root, classes, DIGITS_COUNT, ".png"):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} exists and is not the digits set: give an empty or new folder")
    digits = load_digits()
    ink = np.clip(np.rint(255.0 - digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # 0..16 -> white..black
    tmp = root.with_name(f".{root.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover of a killed write, never the user's root
    for c in classes:
        (tmp / c).mkdir(parents=True)
    for i, (img, label) in enumerate(zip(ink, digits.target)):
        pic = Image.fromarray(img, mode="L").resize((size, size), Image.BILINEAR)
        pic.save(tmp / str(label) / f"{label}_{i:04d}.png")
    if root.exists():
        root.rmdir()  # empty (checked above)
    tmp.rename(root)
    return root


SETS = {"digits": write_digits}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(SETS))
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=32, help="side of each written image, pixels")
    args = ap.parse_args(argv)
    try:
        path = SETS[args.name](args.out, size=args.size)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.name}: {sum(1 for _ in path.rglob('*.png'))} images in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
