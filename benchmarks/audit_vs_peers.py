"""`audit` beside cleanvision and cleanlab on planted problems in real photos, real features, one run.

Planted sets are built from the tutorial's photos (never modified: copies under --work):
- copies: val copies of train photos, one exact and five edited ones per original (90% crop, brighter by
  15%, mirrored, down-up scaled, resized 80% + JPEG q70);
- photos not worth training on: seven made from train photos (very dark, overexposed, blurred, near blank,
  a 1:6 strip, tiny, grayscale), with 100 ordinary photos beside them counted as false alarms;
- wrong labels: 30 train labels moved to another class in a copy of a real cache (10-class digits) and 12
  in ants vs bees.
Features come from a real ImageNet backbone (an EfficientNet-Lite .pt2 made by make_feature_program.py)
and, for the copies, also from a random-init ResNet-18. cleanvision runs on the same folders, cleanlab's
find_label_issues on out-of-fold LogisticRegression probabilities of the same cached features.

cleanvision and cleanlab are not dependencies of the tool; they live in their own environment:

    python3 -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install cleanvision cleanlab h5py scikit-learn
    python benchmarks/audit_vs_peers.py --program /tmp/real/efficientnet-lite0.pt2 \\
        --digits-cache /tmp/real/digits_lite0.h5 --peers-python /tmp/peers-venv/bin/python --work /tmp/avp
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "hymenoptera_data"
EDITS = ("crop90", "bright15", "mirror", "downup", "resize80_q70")
PROBLEMS = {"dark": "dark", "overexposed": "light", "blurred": "blurry", "blank": "low_information",
            "strip": "odd_aspect_ratio", "tiny": "odd_size", "gray": "grayscale"}


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


def edited(img: Image.Image, kind: str) -> tuple[Image.Image, int]:
    """(edited copy, JPEG quality to save it at)."""
    w, h = img.size
    if kind == "crop90":
        dx, dy = round(w * 0.05), round(h * 0.05)
        return img.crop((dx, dy, w - dx, h - dy)), 90
    if kind == "bright15":
        return ImageEnhance.Brightness(img).enhance(1.15), 90
    if kind == "mirror":
        return ImageOps.mirror(img), 90
    if kind == "downup":
        return img.resize((w // 2, h // 2), Image.BILINEAR).resize((w, h), Image.BILINEAR), 90
    if kind == "resize80_q70":
        return img.resize((round(w * 0.8), round(h * 0.8)), Image.LANCZOS), 70
    raise ValueError(kind)


def problem_photo(img: Image.Image, kind: str, seed: int) -> Image.Image:
    w, h = img.size
    if kind == "dark":
        return ImageEnhance.Brightness(img).enhance(0.08)
    if kind == "overexposed":
        return Image.fromarray(np.clip(np.asarray(img, np.float32) * 2.5 + 90, 0, 255).astype(np.uint8))
    if kind == "blurred":
        return img.filter(ImageFilter.GaussianBlur(radius=max(w, h) / 60))
    if kind == "blank":  # a nearly white sheet with faint noise and a small smudge
        g = np.random.default_rng(seed)
        a = np.full((h, w, 3), 236, np.float32) + g.normal(0, 1.5, (h, w, 3))
        a[h // 2:h // 2 + h // 20, w // 3:w // 3 + w // 20] -= 25
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if kind == "strip":  # 1:6, cut across the photo
        sh = max(8, w // 6)
        return img.crop((0, (h - sh) // 2, w, (h - sh) // 2 + sh))
    if kind == "tiny":
        return img.resize((32, 24), Image.LANCZOS)
    if kind == "gray":
        return ImageOps.grayscale(img).convert("RGB")
    raise ValueError(kind)


def _fresh_copy(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def _train_photos(root: Path) -> list[Path]:
    return sorted(p for p in (root / "train").rglob("*.jpg"))


def plant_copies(src: Path, dst: Path, per_kind: int = 1, seed: int = 0) -> tuple[list[tuple], list[tuple]]:
    """dst = src + val copies of train photos. Returns (exact [(original, copy)], edited [(original, copy, kind)])
    as paths relative to dst; originals drawn without replacement."""
    root = _fresh_copy(src, dst)
    photos = _train_photos(root)
    pick = np.random.default_rng(seed).permutation(len(photos))
    exact, edits = [], []
    k = 0
    for kind in ("exact",) + EDITS:
        for _ in range(per_kind):
            orig = photos[pick[k]]
            k += 1
            cls = orig.parent.name
            out = root / "val" / cls / f"copy_{kind}_{orig.stem}.jpg"
            rel = (orig.relative_to(root).as_posix(), out.relative_to(root).as_posix())
            if kind == "exact":
                shutil.copyfile(orig, out)
                exact.append(rel)
            else:
                img, q = edited(_rgb(orig), kind)
                img.save(out, quality=q)
                edits.append((*rel, kind))
    return exact, edits


def plant_problems(src: Path, dst: Path, seed: int = 0, fresh: bool = True) -> dict[str, str]:
    """dst = src + seven problem photos in train, made from other train photos (those of the tutorial: names
    without copy_/problem_). Returns {relative path: kind}."""
    root = _fresh_copy(src, dst) if fresh else dst
    photos = [p for p in _train_photos(root) if not p.name.startswith(("copy_", "problem_"))]
    pick = np.random.default_rng(seed + 1).permutation(len(photos))
    out = {}
    for n, (name, kind) in enumerate(PROBLEMS.items()):
        orig = photos[pick[n]]
        p = orig.parent / f"problem_{name}_{orig.stem}.jpg"
        problem_photo(_rgb(orig), name, seed + n).save(p, quality=92)
        out[p.relative_to(root).as_posix()] = kind
    return out


def extract(data: Path, cache: Path, backbone: str, weights: str, workers: int) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, str(REPO / "cli.py"), "extract", str(data), "--cache", str(cache), "--backbone", backbone,
           "--weights", weights, "--workers", str(workers)]  # a rerun reuses the rows of unchanged files
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_audit(cache: Path, out: Path, *extra: str) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, str(REPO / "cli.py"), "audit", str(cache), "--out", str(out), "--no-plots", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "audit.json").read_text())


def audit_pairs(j: dict) -> set[frozenset]:
    pairs = {frozenset((d["a"], d["b"])) for d in j["duplicates"]}
    for g in j["copy_groups"]:
        files = [f["path"] for f in g["files"]]
        pairs |= {frozenset((a, b)) for i, a in enumerate(files) for b in files[i + 1:]}
    return pairs


def peers(python: str, task: dict) -> dict:
    """Run a task in the peers' environment (this file's peer_main); returns its JSON answer."""
    r = subprocess.run([python, __file__, "--peer-task", json.dumps(task)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"peer task {task['kind']} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- inside the peers' environment


def peer_main(task: dict) -> dict:
    if task["kind"] == "cleanvision":
        import logging

        logging.disable(logging.WARNING)
        from cleanvision import Imagelab

        lab = Imagelab(data_path=task["data"])
        lab.find_issues()
        issues = lab.issues
        out = {"issues": {}, "near_sets": [], "exact_sets": []}
        for col in issues.columns:
            if col.startswith("is_") and col.endswith("_issue"):
                kind = col[3:-6]
                hits = issues.index[issues[col]].tolist()
                out["issues"][kind] = [str(Path(p).resolve().relative_to(Path(task["data"]).resolve())) for p in hits]
        for key in ("near_duplicates", "exact_duplicates"):
            sets = lab.info.get(key, {}).get("sets", [])
            out["near_sets" if key.startswith("near") else "exact_sets"] = [
                [str(Path(p).resolve().relative_to(Path(task["data"]).resolve())) for p in s] for s in sets]
        return out
    if task["kind"] == "cleanlab":
        import h5py
        from cleanlab.filter import find_label_issues
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold, cross_val_predict
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        with h5py.File(task["cache"], "r") as f:
            X, y = f["train/features"][...], f["train/labels"][...]
            paths = [p.decode() if isinstance(p, bytes) else p for p in f["train/paths"][...]]
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        proba = cross_val_predict(model, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0),
                                  method="predict_proba")
        ranked = find_label_issues(y, proba, return_indices_ranked_by="self_confidence")
        return {"ranked": [paths[i] for i in ranked]}
    raise ValueError(task["kind"])


# --------------------------------------------------------------------------- the benchmark


def flip_labels(cache: Path, out: Path, n: int, seed: int = 0) -> list[str]:
    """A copy of cache with n train labels moved to another class (the rows chosen at random). The copy keeps
    the cache's fingerprint; its labels dataset is rewritten whole (checksummed like the original)."""
    import h5py

    shutil.copyfile(cache, out)
    with h5py.File(out, "r+") as f:
        y = f["train/labels"][...]
        k = len(json.loads(f.attrs["class_names"]))
        g = np.random.default_rng(seed)
        rows = g.choice(len(y), n, replace=False)
        y[rows] = (y[rows] + g.integers(1, k, n)) % k
        f["train/labels"][...] = y
        every = f["train/paths"][...]
        paths = [every[r].decode() if isinstance(every[r], bytes) else every[r] for r in rows]
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--program", required=False, help="EfficientNet-Lite .pt2 (make_feature_program.py)")
    ap.add_argument("--digits-cache", type=Path, help="a cache of the digits set with the same backbone")
    ap.add_argument("--ants-cache", type=Path, help="a cache of the tutorial's photos with the same backbone")
    ap.add_argument("--peers-python", default="/tmp/peers-venv/bin/python")
    ap.add_argument("--work", type=Path, default=Path("/tmp/audit_vs_peers"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--peer-task", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer_task:
        print(json.dumps(peer_main(json.loads(args.peer_task))))
        return 0
    print(json.dumps(run_table(args), indent=1))
    return 0


def _copies_row(found: set, exact, edits) -> dict:
    planted = {frozenset(p[:2]) for p in edits}
    # a problem photo is an edit of a train photo too (the grayscale one is its copy): neither counts as distinct
    distinct = {p for p in found if not any(Path(x).name.startswith(("copy_", "problem_")) for x in p)}
    return {"exact": f"{sum(frozenset(p) in found for p in exact)} of {len(exact)}",
            "edited": f"{len(planted & found)} of {len(planted)}",
            "edited_missed": sorted(k for *p, k in edits if frozenset(p) not in found),
            "distinct_pairs_listed": len(distinct)}


def _problems_row(listed: dict[str, set], problems: dict[str, str], ordinary: list[str]) -> dict:
    named = [p for p, k in problems.items() if k in listed.get(p, set())]
    first100 = ordinary[:100]
    return {"named_by_kind": f"{len(named)} of {len(problems)}",
            "missed": sorted(problems[p] for p in problems if p not in named),
            "ordinary_listed_of_100": sum(p in listed for p in first100),
            "ordinary_listed_of_all": f"{sum(p in listed for p in ordinary)} of {len(ordinary)}"}


def run_table(args) -> dict:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    data = work / "planted"
    exact, edits = plant_copies(args.data, data, per_kind=1, seed=0)
    problems = plant_problems(args.data, data, seed=0, fresh=False)
    ordinary = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg")
                      if not p.name.startswith(("copy_", "problem_")))
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "images": len(list(data.rglob("*.jpg")))}
    caches = {"real": (work / "planted_real.h5", args.program, "imagenet"),
              "random": (work / "planted_random.h5", "resnet18", "none")}
    for name, (cache, backbone, weights) in caches.items():
        out[f"extract_s_{name}"] = round(extract(data, cache, backbone, weights, args.workers), 1)
    t0 = time.perf_counter()
    cv = peers(args.peers_python, {"kind": "cleanvision", "data": str(data)})
    out["cleanvision_s"] = round(time.perf_counter() - t0, 1)
    cv_pairs = {frozenset((a, b)) for key in ("near_sets", "exact_sets") for s in cv[key]
                for i, a in enumerate(s) for b in s[i + 1:]}
    cv_listed: dict[str, set] = {}
    for kind, paths in cv["issues"].items():
        for p in paths:
            cv_listed.setdefault(p, set()).add(kind)
    for name, (cache, _, _) in caches.items():
        j = run_audit(cache, work / f"audit_{name}")
        out[f"copies_audit_{name}"] = _copies_row(audit_pairs(j), exact, edits)
        if name == "real":
            listed: dict[str, set] = {}
            for x in j["image_issues"]:
                listed.setdefault(x["path"], set()).add(x["kind"])
            out["photos_audit"] = _problems_row(listed, problems, ordinary)
    out["copies_cleanvision"] = _copies_row(cv_pairs, exact, edits)
    out["photos_cleanvision"] = _problems_row(cv_listed, problems, ordinary)
    labels = {}
    for name, cache, n in (("digits", args.digits_cache, 30), ("ants", args.ants_cache, 12)):
        if cache is None:
            continue
        flipped = work / f"{name}_flipped.h5"
        planted = set(flip_labels(cache, flipped, n, seed=0))
        j = run_audit(flipped, work / f"audit_labels_{name}", "--top", str(n), "--label-threshold", "0")
        mine = [x["path"] for x in j["label_issues"]][:n]
        cl = peers(args.peers_python, {"kind": "cleanlab", "cache": str(flipped)})["ranked"]
        labels[name] = {"planted": n, "audit_top": sum(p in planted for p in mine),
                        "cleanlab_top": sum(p in planted for p in cl[:n]), "cleanlab_flagged": len(cl),
                        "cleanlab_flagged_planted": sum(p in planted for p in cl)}
    out["labels"] = labels
    return out


if __name__ == "__main__":
    sys.exit(main())
