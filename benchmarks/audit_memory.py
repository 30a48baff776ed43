"""Peak memory and time of the audit's similarity search at 20k and 100k synthetic rows (512-D).

Each size runs in a fresh child process, which reads its own peak RSS (ru_maxrss) three times: after
importing torch, after building the features (N x 512 float32, as read from a cache), and after
unit_rows + neighbour_search (the centred unit copy, top-5 per row, every pair >= 0.997, block by
block). The audit's own cost is the last minus the middle one; an N x N float32 matrix would be
N^2 x 4 bytes (1.6 GB at 20k, 40 GB at 100k). 200 planted near-duplicate pairs check it still finds them.

    python benchmarks/audit_memory.py [--sizes 20000,100000] [--block 2048]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(n: int, block: int) -> dict:
    import numpy as np
    import torch  # noqa: F401  (imported before the first reading, so its libraries count as baseline)

    from pipeline.audit import neighbour_search, unit_rows

    base = rss_mib()
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((200, 512), dtype=np.float32)
    X = np.empty((n, 512), np.float32)
    for a in range(0, n, 4096):  # in float32 chunks: no float64 temporaries inflating the baseline
        m = min(4096, n - a)
        X[a:a + m] = centers[rng.integers(0, 200, m)] + rng.standard_normal((m, 512), dtype=np.float32)
    planted = rng.choice(n, 400, replace=False).reshape(200, 2)
    X[planted[:, 1]] = X[planted[:, 0]] + 0.01 * rng.standard_normal((200, 512), dtype=np.float32)
    before = rss_mib()
    t0 = time.perf_counter()
    F = unit_rows(X)  # the audit's own copy, mean-centred and normalised
    sims, idx, pairs = neighbour_search(F, 5, 0.997, block=block)
    seconds = time.perf_counter() - t0
    after = rss_mib()
    found = {tuple(sorted(p)) for p in pairs[:, :2].astype(int).tolist()}
    want = {tuple(sorted(p)) for p in planted.tolist()}
    return {"rows": n, "block": block, "seconds": round(seconds, 1), "rss_torch_mib": round(base),
            "rss_with_features_mib": round(before), "rss_peak_mib": round(after),
            "audit_extra_mib": round(after - before), "features_mib": round(X.nbytes / 2**20),
            "n_by_n_would_be_mib": round(n * n * 4 / 2**20), "pairs": len(pairs),
            "planted_found": len(found & want), "planted": len(want)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="20000,100000")
    ap.add_argument("--block", type=int, default=2048)
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.block)))
        return
    for n in (int(s) for s in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--child", str(n), "--block", str(args.block)],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip(), flush=True)


if __name__ == "__main__":
    main()
