"""CPU cost of the decode workers per image: float32 crops (the old worker: ToTensor + Normalize in the
worker, 600 KB per image) vs uint8 crops (normalised later on the device as one batch, 150 KB), and
the torchvision decoder's workers (read bytes only).

One DataLoader worker (torch runs it single-threaded) goes through the real data; its CPU time comes
from getrusage(RUSAGE_CHILDREN) once the worker has exited, so it counts everything the worker does
(decode, transform, collate, shared-memory hand-off). The main process's CPU for receiving the batches
(and, for uint8, the one batched normalisation a CPU extract does) is reported beside it. The modes
alternate for --rounds rounds; medians are printed.

    python benchmarks/decode_cost.py [--data DIR] [--rounds 3] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data import BadImage, ImageFiles, load_rgb, normalize_batch, scan_dataset  # noqa: E402
from pipeline.device_decode import RawFiles, collate_raw  # noqa: E402
from pipeline.preprocess import Preprocess  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/datasets/hymenoptera_data"


class FloatFiles(torch.utils.data.Dataset):
    """The worker before uint8 crops: the tutorial's full eval transform, float32 out (as ImageFiles was)."""

    def __init__(self, files):
        self.files = files
        s = Preprocess()
        self.tf = T.Compose([T.Resize(s.resize), T.CenterCrop(s.crop), T.ToTensor(), T.Normalize(s.mean, s.std)])

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        g, i = key
        try:
            return self.tf(load_rgb(self.files[i])), torch.zeros(0), g, i, ""
        except BadImage as e:
            return torch.zeros(3, 224, 224), torch.zeros(0), g, i, str(e)


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def one_round(mode: str, files: list[str], batch_size: int) -> tuple[float, float]:
    """(worker CPU ms per image, main-process CPU ms per image) of one pass over files."""
    keys = [(0, i) for i in range(len(files))]
    batches = [keys[s:s + batch_size] for s in range(0, len(keys), batch_size)]
    if mode == "float32":
        ds, collate = FloatFiles(files), None
    elif mode == "uint8":
        ds, collate = ImageFiles([(files, files, 0)], Preprocess()), None
    else:
        ds, collate = RawFiles([(files, files, 0)]), collate_raw
    loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=1, collate_fn=collate)
    c0, m0 = children_cpu(), time.process_time()
    for batch in loader:
        if mode == "uint8":
            normalize_batch(batch[0], Preprocess())  # what the CPU extract does in the main process
    main = time.process_time() - m0
    del loader  # the worker exits and is reaped: its CPU time lands in RUSAGE_CHILDREN
    time.sleep(0.2)
    return (children_cpu() - c0) * 1000 / len(files), main * 1000 / len(files)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N images (0: all)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = scan_dataset(args.data, ["train", "val"])
    files = [str(data.root / p) for sp in data.splits.values() for p in sp.paths]
    files = files[:args.limit] if args.limit else files
    modes = ["float32", "uint8", "raw bytes"]
    got = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m in modes:
            got[m].append(one_round(m, files, args.batch_size))
    print(f"{len(files)} images, batch {args.batch_size}, 1 worker, {args.rounds} rounds (medians)\n")
    print("| worker ships | worker CPU ms/image | main CPU ms/image | rounds (worker ms) |\n|---|---:|---:|---|")
    result = {}
    for m in modes:
        w = statistics.median(r[0] for r in got[m])
        mm = statistics.median(r[1] for r in got[m])
        result[m] = (w, mm)
        label = {"float32": "float32 crops (before)", "uint8": "uint8 crops (now)",
                 "raw bytes": "raw bytes (--decoder torchvision)"}[m]
        print(f"| {label} | {w:.2f} | {mm:.2f} | {', '.join(f'{r[0]:.2f}' for r in got[m])} |")
    return result


if __name__ == "__main__":
    main()
