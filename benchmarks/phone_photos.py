"""Phone photos: default extract vs the plain torchvision loop a user would write, on 12 MP JPEGs.

Builds N JPEGs of 4032 x 3024 at quality 90 by upscaling the tutorial's photos (train/val x ants/bees),
then times, in alternating rounds on the same warm files:
  - plain: ImageFolder + Resize(256) + CenterCrop(224) + ToTensor + Normalize, DataLoader, model forward
  - extract: `cli.py extract` with its defaults (JPEGs decoded at the DCT scale keeping 2 x 256)
  - exact: the same with --jpeg-decode exact (full-size decode: the reference)
each end to end in this process, with the same model, batch and workers. Features of the default extract
are compared with the full-size decode's (relative L2 per image), with the speed model and with a backbone
whose ImageNet weights ship in a package (efficientnet_lite0), since random weights are less sensitive.

    python benchmarks/phone_photos.py [--n 40] [--rounds 2] [--workers 2] [--data DIR]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache import read_cache  # noqa: E402
from pipeline.backbones import imagenet_weights_path  # noqa: E402
from pipeline.extract import ExtractConfig, extract  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/datasets/hymenoptera_data"
SIZE = (4032, 3024)


def make_photos(src: Path, dst: Path, n: int) -> int:
    """n/4 photos per (split, class), upscaled to 12 MP and saved at quality 90; returns how many."""
    made = 0
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            out = dst / split / cls
            out.mkdir(parents=True)
            for f in sorted((src / split / cls).glob("*.jpg"))[: n // 4]:
                Image.open(f).convert("RGB").resize(SIZE, Image.BICUBIC).save(out / f.name, quality=90)
                made += 1
    return made


def plain_loop(root: Path, weights: str, workers: int, batch: int) -> tuple[float, np.ndarray]:
    """What a user writes from the tutorial: (seconds, features in ImageFolder order, train then val)."""
    import torchvision
    from torchvision import datasets, transforms as T

    t0 = time.perf_counter()
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights="IMAGENET1K_V1" if weights == "imagenet" else None)
    model.fc = torch.nn.Identity()
    model.eval()
    feats = []
    with torch.inference_mode():
        for split in ("train", "val"):
            loader = torch.utils.data.DataLoader(datasets.ImageFolder(root / split, tf), batch_size=batch,
                                                 num_workers=workers)
            feats += [model(x).numpy() for x, _ in loader]
    return time.perf_counter() - t0, np.concatenate(feats)


def run_extract(root: Path, cache: Path, workers: int, batch: int, **kw) -> float:
    t0 = time.perf_counter()
    extract(ExtractConfig(str(root), str(cache), workers=workers, batch_size=batch, **kw))
    return time.perf_counter() - t0


def features(cache: Path) -> np.ndarray:
    """Rows in ImageFolder's order (sorted classes, sorted files), train then val."""
    c = read_cache(cache)
    out = []
    for s in ("train", "val"):
        sp = c.splits[s]
        order = np.argsort(np.array([str(p) for p in sp.paths]), kind="stable")
        out.append(sp.features[order])
    return np.concatenate(out)


def decode_seconds(root: Path, draft) -> float:
    """Decode + Resize 256 + CenterCrop 224 of every photo in this process (one core, no model)."""
    from pipeline.data import load_rgb, resize_crop_pil
    from pipeline.preprocess import Preprocess

    t0 = time.perf_counter()
    for f in sorted(root.rglob("*.jpg")):
        resize_crop_pil(load_rgb(f, draft=draft), Preprocess())
    return time.perf_counter() - t0


def rel_l2(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-lite0", action="store_true", help="skip the fidelity check with efficientnet_lite0")
    args = ap.parse_args(argv)
    weights = "imagenet" if imagenet_weights_path("resnet18").is_file() else "none"
    w, b = args.workers, args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "phone"
        n = make_photos(args.data, root, args.n)
        for f in root.rglob("*.jpg"):
            f.read_bytes()  # warm page cache for every method alike
        times = {"plain": [], "extract": [], "exact": []}
        for r in range(args.rounds):  # alternate, so a busy spell on the shared machine hits all three
            t, plain = plain_loop(root, weights, w, b)
            times["plain"].append(t)
            times["extract"].append(run_extract(root, Path(tmp) / f"fast{r}.h5", w, b, weights=weights))
            times["exact"].append(run_extract(root, Path(tmp) / f"exact{r}.h5", w, b, weights=weights,
                                              jpeg_decode="exact"))
        fast, exact = features(Path(tmp) / "fast0.h5"), features(Path(tmp) / "exact0.h5")
        one_core = {k: decode_seconds(root, d) for k, d in (("exact", None), ("fast", (512, 512)))}
        lite = None
        if not args.no_lite0:
            kw = dict(backbone="efficientnet_lite0", weights="imagenet")
            run_extract(root, Path(tmp) / "lf.h5", w, b, **kw)
            run_extract(root, Path(tmp) / "le.h5", w, b, jpeg_decode="exact", **kw)
            lite = rel_l2(features(Path(tmp) / "lf.h5"), features(Path(tmp) / "le.h5"))
    print(f"{n} JPEGs of {SIZE[0]} x {SIZE[1]} (quality 90), resnet18 weights {weights}, workers {w}, batch {b}, "
          f"{args.rounds} alternating rounds (median; all: "
          + ", ".join(f"{k} {' '.join(f'{t:.1f}' for t in v)} s" for k, v in times.items()) + ")")
    med = {k: statistics.median(v) for k, v in times.items()}
    print("\n| method | seconds | images/s | vs plain |\n|---|---:|---:|---:|")
    for k, label in (("plain", "plain torchvision loop"), ("extract", "extract (default: fast decode)"),
                     ("exact", "extract --jpeg-decode exact")):
        print(f"| {label} | {med[k]:.1f} | {n / med[k]:.1f} | {med['plain'] / med[k]:.2f}x |")
    print(f"\ndecode + Resize + CenterCrop alone, one core: exact {n / one_core['exact']:.1f} images/s, fast "
          f"{n / one_core['fast']:.1f} images/s ({one_core['exact'] / one_core['fast']:.1f}x); the rest of extract's time "
          "is the model's forward, which the plain loop pays too")
    rn = rel_l2(fast, exact)
    print(f"\nrelative L2 of default vs full-size decode features, resnet18 ({weights}): max {rn.max():.4f} "
          f"mean {rn.mean():.4f}; plain loop vs exact extract: max {rel_l2(plain, exact).max():.2e}")
    if lite is not None:
        print(f"efficientnet_lite0 (ImageNet weights): max {lite.max():.4f} mean {lite.mean():.4f}")


if __name__ == "__main__":
    main()
