"""Stability vs exact balance of a flat folder's split (the numbers behind pipeline/splits.py's choice).

For random classes of n files, adds m files and compares two rules at fraction f:
  hash:  a file is val when its own hash u < f (what the tool does): never moves an old file, its val
         count is Binomial(n, f);
  exact: the round(f * n) lowest hashes of the class are val: exact count, but old files move.
Prints, per (n, m): mean and max |val - f n| and, for the exact rule, how often adding moved an old
file and how many. Pure numpy, a second or two.

    python benchmarks/split_stability.py [--trials 2000] [--fraction 0.2]
"""
from __future__ import annotations

import argparse
import math

import numpy as np


def exact_rule(u: np.ndarray, f: float) -> np.ndarray:
    k = int(math.floor(f * len(u) + 0.5))
    val = np.zeros(len(u), bool)
    val[np.argsort(u)[:k]] = True
    return val


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=2000)
    ap.add_argument("--fraction", type=float, default=0.2)
    args = ap.parse_args()
    f, rng = args.fraction, np.random.default_rng(0)
    print(f"{'n':>5} {'added':>6} | hash: mean|dev| max|dev| moved | exact: mean|dev| P(moved>=1) mean moved")
    for n in (10, 30, 120, 400):
        for m in sorted({1, max(1, n // 10), n // 2}):
            dev_h, dev_e, moved, any_moved = [], [], [], 0
            for _ in range(args.trials):
                u = rng.random(n + m)  # a hash per file: uniform, independent
                dev_h.append(abs((u[:n] < f).sum() - f * n))
                before, after = exact_rule(u[:n], f), exact_rule(u, f)[:n]
                dev_e.append(abs(before.sum() - f * n))
                k = int((before != after).sum())
                moved.append(k)
                any_moved += k > 0
            print(f"{n:>5} {m:>6} | {np.mean(dev_h):>15.2f} {np.max(dev_h):>8.1f} {0:>5} | "
                  f"{np.mean(dev_e):>16.2f} {any_moved / args.trials:>11.2f} {np.mean(moved):>10.2f}")


if __name__ == "__main__":
    main()
