"""The backbones available offline, side by side: feature size, parameters, the preprocessing each records,
and `extract` images/s on this machine (a small run: N photos of the tutorial's val split, else synthetic).

    python benchmarks/backbone_table.py [--n 32] [--workers 1] [--backbones efficientnet_lite0,resnet18,...]

EfficientNet-Lite0 runs on its real ImageNet weights (the `offline` extra), every other backbone on random
weights (`--weights none`: timing does not depend on the weights' values). timm backbones need the `timm`
extra."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT = ("efficientnet_lite0", "resnet18", "timm:vit_tiny_patch16_224", "timm:vit_small_patch16_224",
           "timm:convnext_atto", "timm:convnext_tiny")


def photos(root: Path, n: int) -> Path:
    """root/val/{ants,bees}/: n photos of the tutorial's val split (links), else synthetic 400 x 300 ones."""
    from tests.conftest import real_data_dir, write_image

    real = real_data_dir()
    for i in range(n):
        cls = ("ants", "bees")[i % 2]
        dest = root / "val" / cls / f"{i:03d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if real:
            src = sorted((real / "val" / cls).glob("*.jpg"))[i // 2]
            os.symlink(src, dest)
        else:
            write_image(dest, i % 2, i, size=(400, 300))
    return root


def measure(backbone: str, data: Path, work: Path, workers: int) -> dict:
    from click.testing import CliRunner

    from cache import read_cache
    from cli import cli
    from pipeline.backbones import BackboneSpec, build_backbone

    weights = "imagenet" if backbone == "efficientnet_lite0" else "none"
    bb = build_backbone(BackboneSpec(backbone, weights))
    params = sum(p.numel() for p in bb.module.parameters())
    cache = work / f"{backbone.replace(':', '_')}.h5"
    args = ["extract", str(data), "--cache", str(cache), "--backbone", backbone, "--weights", weights,
            "--splits", "val", "--workers", str(workers), "--batch-size", "16"]
    t = time.perf_counter()
    r = CliRunner().invoke(cli, args)
    seconds = time.perf_counter() - t
    if r.exit_code != 0:
        raise SystemExit(r.output)
    meta = read_cache(cache).meta
    forward = forward_rate(bb.module, meta.transform["spec"]["crop"])
    spec = meta.transform["spec"]
    n = len(read_cache(cache).splits["val"].paths)
    return {"backbone": backbone, "weights": weights, "dim": bb.feature_dim, "params": params,
            "preprocess": f"{spec['resize']}/{spec['crop']} {spec['interpolation']}, mean {spec['mean'][0]:g}",
            "seconds": seconds, "images_s": n / seconds, "forward_s": forward}


def forward_rate(module, crop: int, batch: int = 16, rounds: int = 3) -> float:
    """images/s of the backbone alone on an in-memory batch (after one warm-up batch)."""
    import torch

    x = torch.rand(batch, 3, crop, crop)
    with torch.inference_mode():
        module(x)
        t = time.perf_counter()
        for _ in range(rounds):
            module(x)
    return batch * rounds / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--backbones", default=",".join(DEFAULT))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="backbones_"))
    try:
        data = photos(work / "data", a.n)
        print("| backbone | weights | features | parameters | preprocessing (resize/crop) | extract images/s "
              "| forward images/s |")
        print("|---|---|---:|---:|---|---:|---:|")
        for name in a.backbones.split(","):
            m = measure(name, data, work, a.workers)
            print(f"| `{m['backbone']}` | {m['weights']} | {m['dim']} | {m['params'] / 1e6:.1f} M | {m['preprocess']} "
                  f"| {m['images_s']:.1f} | {m['forward_s']:.1f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
