"""Extraction throughput against the pure-forward ceiling of the same model, batch, threads and layout.

The ceiling: the backbone's forward on a random batch already in memory (no decoding, no transforms,
no writes), timed after warm-up. Extraction: `extract` on the real data end to end (scan, decode,
transform, forward, segment writes, HDF5 assembly). Both run in this one process.

    python benchmarks/extract_ceiling.py [--data DIR] [--precision fp32|bf16] [--batch-size 64] [--draft]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.backbones import BackboneSpec, build_backbone  # noqa: E402
from pipeline.extract import ExtractConfig, extract  # noqa: E402
from pipeline.runtime import resolve_runtime  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/datasets/hymenoptera_data"


def forward_ceiling(precision: str, device: str, batch: int, layout: str, seconds: float = 8.0) -> float:
    """Images/s of the pooled forward alone on an in-memory batch."""
    rt = resolve_runtime(device, precision)
    model = build_backbone(BackboneSpec("resnet18", "none")).module
    model = model.to(rt.device).eval()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    # the batch lives on the device in its layout: the model is measured, not a pageable copy per iteration
    x = torch.randn(batch, 3, 224, 224).to(rt.device).contiguous(memory_format=fmt)
    with torch.inference_mode(), rt.autocast():
        for _ in range(3):
            model(x)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model(x)
            n += batch
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--draft", action="store_true")
    ap.add_argument("--decoder", default="pil", choices=["pil", "torchvision"])
    ap.add_argument("--rounds", type=int, default=3, help="alternate ceiling and extract this many times")
    args = ap.parse_args(argv)
    if not (args.data / "train").is_dir():
        sys.exit(f"dataset not found at {args.data}; pass --data")
    # the machine's speed drifts (shared VM): alternate the two measurements and compare medians
    contiguous = forward_ceiling(args.precision, args.device, args.batch_size, "contiguous")
    kw = {} if args.workers is None else {"workers": args.workers}
    ceil_runs, extract_runs = [], []
    for _ in range(args.rounds):
        ceil_runs.append(forward_ceiling(args.precision, args.device, args.batch_size, "channels_last"))
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ExtractConfig(str(args.data), f"{tmp}/f.h5", weights="none", precision=args.precision,
                                device=args.device, batch_size=args.batch_size, draft=args.draft,
                                decoder=args.decoder, **kw)
            s = extract(cfg)
        extract_runs.append(s["images_per_s"])
    n = sum(s["rows"].values())
    ceiling, ours = statistics.median(ceil_runs), statistics.median(extract_runs)
    print(f"threads {torch.get_num_threads()}, workers {cfg.workers}, batch {args.batch_size}, "
          f"precision {args.precision}, draft {args.draft}, decoder {args.decoder}, {args.rounds} alternating rounds")
    print("\n| measurement | images/s (median) | each round |\n|---|---:|---|")
    print(f"| pure forward, contiguous | {contiguous:.1f} | |")
    print(f"| pure forward, channels_last | {ceiling:.1f} | {', '.join(f'{v:.1f}' for v in ceil_runs)} |")
    print(f"| extract end to end ({n} images) | {ours:.1f} | {', '.join(f'{v:.1f}' for v in extract_runs)} |")
    ratio = ours / ceiling
    print(f"\nextract / pure-forward ceiling (channels_last, medians): {ratio:.1%}")
    return {"ceiling": ceiling, "extract": ours, "ratio": ratio}


if __name__ == "__main__":
    main()
