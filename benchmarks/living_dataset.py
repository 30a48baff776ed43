"""The living dataset (issue 28): a fix to the folder updates the cache in a fraction of a rebuild.

    python benchmarks/living_dataset.py [--work /tmp/living] [--n 2000] [--stat-n 20000] [--workers N]

Side by side in one run, each command a fresh `python cli.py extract ...` process (start-up included,
random-init ResNet-18, offline, warm file cache):

1. N synthetic photos (train/ and val/ folders, two classes, 80/20) are extracted once. Then 10% of train
   is relabelled (moved to the other class folder) and a class of 5% new photos is added. The same
   `extract` updates the cache; `extract --force` into another cache rebuilds it from scratch. Goal: the
   update's wall <= 1/10 of the rebuild's, and both caches hold the same rows, labels and paths, features
   equal to float tolerance.
2. A rerun with nothing changed over STAT_N files next to `python -c "import torch"`. Goal: within 2 s of
   it. The STAT_N files are copies of step 1's photos (a flat folder), so their cache is made by
   `--reuse c.h5` without decoding (itself a measure of --reuse at scale); the rerun's work, a stat pass
   and one look at the cache's attributes, does not depend on what the files show.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CLI = str(REPO / "cli.py")
sys.path.insert(0, str(REPO))
ENV = {**os.environ, "TLEARN_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def wall(args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(args, env=ENV, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return took, r.stdout.strip()


def photo(path: Path, label: int, seed: int, size=(64, 48)) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.array([[200, 60, 40], [40, 90, 200], [60, 180, 60]][label % 3], dtype=np.float64)
    arr = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


def make_folder(root: Path, n: int) -> None:
    """n photos: 80% train, 20% val, two classes a and b."""
    for i in range(n):
        split = "val" if i % 5 == 0 else "train"
        photo(root / split / "ab"[i % 2] / f"p{i:06d}.jpg", i % 2, i)


def fix_folder(root: Path, n: int, cls: str = "c", seed0: int = 10**6) -> dict:
    """Relabel 10% of train (move to the other class folder) and add a class cls of 5% new photos."""
    train = sorted((root / "train").rglob("*.jpg"))
    moved = train[:: 10]
    for f in moved:
        other = {"a": "b", "b": "a"}.get(f.parent.name, "a")
        f.rename(root / "train" / other / f.name)
    new = n // 20
    for i in range(new):
        split = "val" if i % 5 == 0 else "train"
        photo(root / split / cls / f"{cls}{i:06d}.jpg", 2, seed0 + i)
    return {"relabelled": len(moved), "new": new}


def extract(data: Path, cache: Path, *extra: str, backbone=("--weights", "none"),
            workers: int | None = None) -> tuple[float, str]:
    w = ["--workers", str(workers)] if workers is not None else []
    return wall([sys.executable, CLI, "extract", str(data), "--cache", str(cache), *backbone, *w, *extra])


def same_caches(a: Path, b: Path) -> str:
    from cache import read_cache

    x, y = read_cache(a), read_cache(b)
    assert x.class_names == y.class_names, (x.class_names, y.class_names)
    worst = 0.0
    for s in y.splits:
        assert x.splits[s].paths == y.splits[s].paths and x.splits[s].labels.tolist() == y.splits[s].labels.tolist()
        np.testing.assert_allclose(x.splits[s].features, y.splits[s].features, rtol=1e-4, atol=1e-5)
        worst = max(worst, float(np.abs(x.splits[s].features - y.splits[s].features).max()))
    rows = {s: len(sp.paths) for s, sp in y.splits.items()}
    return f"equal: rows {rows}, labels and paths exact, features max |diff| {worst:.2g}"


def floor(repeat: int = 3) -> float:
    return statistics.median(wall([sys.executable, "-c", "import torch"])[0] for _ in range(repeat))


def update_vs_rebuild(work: Path, n: int, workers) -> None:
    data = work / "photos"
    shutil.rmtree(data, ignore_errors=True)
    make_folder(data, n)
    cache, rebuilt = work / "c.h5", work / "rebuilt.h5"
    for p in (cache, rebuilt):
        p.unlink(missing_ok=True)
    t_first, _ = extract(data, cache, workers=workers)
    print(f"first extract of {n} photos: {t_first:.1f} s")
    fix = fix_folder(data, n)
    t_up, line = extract(data, cache, workers=workers)
    print(f"update after relabelling {fix['relabelled']} train photos and adding a class of {fix['new']}: "
          f"{t_up:.1f} s\n  {line}")
    t_force, _ = extract(data, rebuilt, "--force", workers=workers)
    print(f"--force rebuild: {t_force:.1f} s")
    print(f"update / rebuild = {t_up / t_force:.3f} (goal <= 0.1); caches {same_caches(cache, rebuilt)}")


def stat_pass(work: Path, n: int, workers, source: Path, photos: Path) -> None:
    """n files copied from the photos of `source` (a cache of them), so the n-file cache is made by
    `--reuse source` without decoding; then the timed reruns with nothing changed."""
    data = work / f"many{n}"
    shutil.rmtree(data, ignore_errors=True)
    files = sorted(photos.rglob("*.jpg"))
    for i in range(n):
        f = files[i % len(files)]
        dest = data / f.parent.name / f"{i:06d}_{f.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    cache = work / f"many{n}.h5"
    cache.unlink(missing_ok=True)
    t_build, line = extract(data, cache, "--reuse", str(source), workers=workers)
    print(f"{n} files (copies of the {len(files)} photos): made by --reuse of their cache in {t_build:.1f} s\n  {line}")
    reruns = [extract(data, cache, workers=workers) for _ in range(3)]
    t_rerun = statistics.median(t for t, _ in reruns)
    t_floor = floor()
    print(f"rerun with nothing changed over {n} files: {t_rerun:.2f} s (median of 3) | python -c 'import torch' "
          f"{t_floor:.2f} s | difference {t_rerun - t_floor:.2f} s (goal <= 2)\n  {reruns[-1][1]}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/living")
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--stat-n", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip", default="", help="comma list of: update, stat")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    if "update" not in a.skip or not (work / "c.h5").exists():
        update_vs_rebuild(work, a.n, a.workers)
    if "stat" not in a.skip:
        stat_pass(work, a.stat_n, a.workers, work / "c.h5", work / "photos")


if __name__ == "__main__":
    main()
