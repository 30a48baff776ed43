"""Scaling of the frozen path: time and peak memory of extract and train-head at 5k / 10k / 20k images.

Builds a synthetic folder (small JPEGs, two classes, 80/20 train/val), then for each size runs
extract and train-head in a fresh child process and reads that process's peak RSS. Time should grow
linearly with the images and extract's memory stay flat (features go to disk batch by batch; the
HDF5 file is assembled segment by segment).

The default backbone is a tiny torch.export program (a strided conv + pooling to 512 features) so
that the run measures the pipeline (decode, transforms, writes, assembly, head) rather than
ResNet-18's 30-45 images/s on this CPU; pass --backbone resnet18 to time the real model.

    python benchmarks/scaling.py [--sizes 5000,10000,20000] [--backbone tiny|resnet18] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_images(root: Path, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        split = "val" if i % 5 == 4 else "train"
        cls = "a" if i % 2 == 0 else "b"
        p = root / split / cls / f"img_{i:06d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        base = np.array([200, 60, 40] if cls == "a" else [40, 90, 200], dtype=np.int16)
        arr = np.clip(base + rng.integers(-40, 40, (48, 64, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(p, quality=90)
        files.append(p)
    return files


def subset(files: list[Path], src: Path, dst: Path, n: int) -> None:
    """dst holds symbolic links to the first n files (same layout)."""
    for f in files[:n]:
        link = dst / f.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f)


def tiny_program(path: Path) -> None:
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 512, 8, stride=8)
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            return torch.flatten(self.pool(torch.relu(self.conv(x))), 1)

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    prog = torch.export.export(Tiny().eval(), (torch.randn(2, 3, 224, 224),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(prog, str(path))


def child(stage: str, data: str, cache: str, out: str, backbone: str) -> None:
    """Run one stage and print its seconds and this process's peak RSS (MiB) as JSON."""
    t0 = time.perf_counter()
    if stage == "extract":
        from pipeline.extract import ExtractConfig, extract

        s = extract(ExtractConfig(data, cache, backbone=backbone, weights="none"))
        extra = {"images_per_s": s["images_per_s"], "rows": s["rows"]}
    else:
        from pipeline.train_head import HeadConfig, run_train_head

        m = run_train_head(HeadConfig(cache, out, plots=False))
        extra = {"train_seconds": m["seconds"]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mib": peak, **extra}))


def run_child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5000,10000,20000")
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--keep", type=Path, default=None, help="build the synthetic folder here and keep it")
    ap.add_argument("--child", nargs=5, metavar=("STAGE", "DATA", "CACHE", "OUT", "BACKBONE"))
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(args.keep or tempfile.mkdtemp(prefix="scaling-"))
    try:
        t0 = time.perf_counter()
        files = make_images(work / "all", max(sizes))
        print(f"made {len(files)} synthetic images in {time.perf_counter() - t0:.1f} s", flush=True)
        backbone = args.backbone
        if backbone == "tiny":
            backbone = str(work / "tiny.pt2")
            tiny_program(Path(backbone))
        print("\n| images | extract s | images/s | extract peak RSS MiB | train-head s (process) "
              "| of which training (25 epochs) | train-head peak RSS MiB |\n|---:|---:|---:|---:|---:|---:|---:|",
              flush=True)
        for n in sizes:
            d = work / f"n{n}"
            subset(files, work / "all", d, n)
            e = run_child("extract", str(d), str(work / f"n{n}.h5"), "-", backbone)
            h = run_child("head", "-", str(work / f"n{n}.h5"), str(work / f"run{n}"), backbone)
            print(f"| {n} | {e['seconds']:.1f} | {e['images_per_s']:.0f} | {e['peak_mib']:.0f} | "
                  f"{h['seconds']:.1f} | {h['train_seconds']:.1f} | {h['peak_mib']:.0f} |", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
