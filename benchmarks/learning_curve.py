"""`train-head --learning-curve` at scale and on real features, in one run: what the curve adds to a
train-head process, next to the floor (`python -c "import torch"`) and the same train-head without it.

Sets: a 20,000-row, 1,280-dim, 10-class cache of Gaussian blobs (the scale of the goal; timing does not
depend on the numbers) written here, and any real caches given with --cache (e.g. the EfficientNet-Lite0
caches that head_vs_sklearn.py leaves in its work folder). Each set: train-head with and without
--learning-curve as processes, alternating, --repeat times; the curve's own seconds as it reports them.

    python benchmarks/learning_curve.py [--cache /tmp/real/digits_lite0.h5 ...] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def blob_cache(path: Path, n: int = 20000, dim: int = 1280, classes: int = 10) -> Path:
    import numpy as np

    from synthetic_cache import write_cache

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(classes, dim)).astype(np.float32) * 0.05

    def split(m: int):
        y = np.arange(m) % classes
        return (centres[y] + rng.normal(size=(m, dim)).astype(np.float32)), y, [f"{i}.jpg" for i in range(m)]

    return write_cache(path, {"train": split(n), "val": split(n // 5)}, [f"c{i}" for i in range(classes)])


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", action="append", default=[])
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sets = [("blobs 20,000 x 1,280, 10 classes", blob_cache(tmp / "blobs.h5"))]
        sets += [(Path(c).name, Path(c)) for c in a.cache]
        load0 = os.getloadavg()[0]
        floor = statistics.median(wall([sys.executable, "-c", "import torch"]) for _ in range(3))
        print(f"floor (python -c 'import torch'): {floor:.2f} s; load {load0:.2f}")
        print("| set | train-head wall (s) | with --learning-curve (s) | curve inside (s) | curve heads | reading |")
        print("|---|---|---|---|---|---|")
        for name, cache in sets:
            plain, curved, inside = [], [], []
            for i in range(a.repeat):
                for lc in (False, True):
                    out = tmp / f"run{len(plain)}{len(curved)}{lc}"
                    cmd = [sys.executable, "cli.py", "train-head", str(cache), "--out", str(out), "--no-plots"]
                    (curved if lc else plain).append(wall(cmd + (["--learning-curve"] if lc else [])))
                    if lc:
                        rec = json.loads((out / "metrics.json").read_text())["learning_curve"]
                        inside.append(rec["seconds"])
            heads = sum(len(p["values"]) for p in rec["points"])
            print(f"| {name} | {statistics.median(plain):.2f} | {statistics.median(curved):.2f} | "
                  f"{statistics.median(inside):.2f} | {heads} | {rec['reading']} |")
        print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
