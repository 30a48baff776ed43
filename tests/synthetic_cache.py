"""A feature cache written straight from arrays (no backbone): for tests that need chosen features."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from cache.attrs import CacheAttrs
from cache.plan import ExtractionPlan, SplitPlan
from cache.store import PartialWriter, fingerprint


def write_cache(path: Path, splits: dict[str, tuple], class_names: list[str], data_dir: str | None = None,
                views: np.ndarray | None = None, digests: dict[str, list[str]] | None = None, **attrs) -> Path:
    """splits = {name: (features (N,D), labels (N,), paths [N])} -> a complete cache at path.

    data_dir: the image folder the cache records, absolute; by default a folder beside the cache that does
    not exist (never one resolved against the current directory, where a quick start may have left data/).
    views: the train split's augmented views (N,K,D); digests: {split: each row's file sha256} (default '').
    attrs: CacheAttrs fields to set other than the synthetic ones."""
    path = Path(path).absolute()
    data_dir = str(Path(data_dir).absolute() if data_dir is not None else path.parent / f"{path.stem}.no-images")
    dim = int(next(iter(splits.values()))[0].shape[1])
    fp = fingerprint({"test": "synthetic", "dim": dim})
    plan = ExtractionPlan(
        fingerprint=fp, feature_dim=dim, views=0 if views is None else int(views.shape[1]), views_split="train", class_names=list(class_names),
        root=str(Path(data_dir).resolve()),
        splits={k: SplitPlan([str(p) for p in v[2]], [int(x) for x in v[1]], [0] * len(v[1]), [0] * len(v[1]))
                for k, v in splits.items()})
    w = PartialWriter(path, plan).open()
    for name, (X, y, paths) in splits.items():
        if len(y):  # no files behind these rows: no content digests to read
            w.write_segment(name, 0, np.asarray(X, np.float32), [""] * len(y),
                            views=None if views is None or name != "train" else np.asarray(views, np.float32),
                            digests=(digests or {}).get(name, [""] * len(y)))
    record = CacheAttrs(fingerprint=fp, files_digest=plan.files_digest, backbone="synthetic", weights="none",
                        backbone_spec={"kind": "synthetic"}, feature_dim=dim, class_names=tuple(class_names),
                        transform={}, precision="fp32", config={"data_dir": data_dir})
    w.finalize(replace(record, **{"views": plan.views, **attrs}), [])
    return path


def blobs(n_per_class: dict[int, int], dim: int = 32, seed: int = 0, spread: float = 1.0):
    """Gaussian class blobs: (X (N,D) float32, y (N,) int64), classes in order."""
    g = np.random.default_rng(seed)
    centers = g.normal(0, 3, (max(n_per_class) + 1, dim))
    y = np.concatenate([np.full(n, c) for c, n in n_per_class.items()]).astype(np.int64)
    X = (centers[y] + g.normal(0, spread, (len(y), dim))).astype(np.float32)
    return X, y
