"""Cross-validation folds that keep copies of one photo together, and the copies themselves.

A photo present twice in train (the same file under two names, or two files with the same bytes) would
otherwise land in two folds: the head that scores one copy trained on the other, so the CV accuracy that
chooses the recipe, the out-of-fold logits the temperature is fitted on, and audit's out-of-fold label
scores all read as if the copy were a new photo (measured on overlapping synthetic blobs: the chosen
recipe's CV 0.925 on a train split of 80 photos each present twice, 0.738 on the same photos once; grouped:
0.725). Copies are rows with the same file bytes (the sha256 the cache records per file) or the
same features (audit.copy_components: the detector audit lists copy groups with). Everything here is
numpy and deterministic for its seed.
"""
from __future__ import annotations

import numpy as np

from . import PipelineError


def group_ids(n: int, comps: list[list[int]]) -> np.ndarray:
    """(n,) group id per row: the first row of its group of copies, or the row itself."""
    gid = np.arange(n, dtype=np.int64)
    for c in comps:
        gid[c] = min(c)
    return gid


def split_copy_groups(cache, split: str = "train") -> np.ndarray:
    """Group id per row of a cache's split (see group_ids): copies by the file sha256 the cache recorded
    (file_stats; '' or absent: unknown) or by equal features."""
    sp = cache.splits[split]
    stats = getattr(cache, "file_stats", None) or {}
    by_digest: dict[str, list[int]] = {}
    for i, p in enumerate(sp.paths):
        st = stats.get(p)
        if st is not None and st.sha256:
            by_digest.setdefault(st.sha256, []).append(i)
    from .audit import copy_components  # audit's detector of copies (same bytes or features)

    comps = copy_components(sp.features, [g for g in by_digest.values() if len(g) > 1])
    return group_ids(len(sp.labels), comps)


def copies_record(groups) -> dict:
    """How many rows share their group with another row, and in how many groups (for reports)."""
    if groups is None:
        return {"rows": 0, "groups": 0}
    _, counts = np.unique(np.asarray(groups), return_counts=True)
    return {"rows": int(counts[counts > 1].sum()), "groups": int((counts > 1).sum())}


def copies_line(groups, what: str) -> str:
    """One report line on the copies kept together ('' when there are none)."""
    c = copies_record(groups)
    if not c["rows"]:
        return ""
    return (f"copies kept together: {c['rows']} train rows are {c['groups']} photos present more than once "
            f"(same bytes or same features); each photo's copies stay in one {what}")


def units(labels, groups=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The photos behind the rows: (unit of each row (N,), label of each unit (U,), rows per unit (U,)), units
    in the order of their first row. A unit's label is its rows' most common label (the lowest of equals):
    a photo copied under two classes is stratified by one of them. Without groups every row is a unit."""
    y = np.asarray(labels, dtype=np.int64)
    if groups is None:
        return np.arange(len(y)), y, np.ones(len(y), dtype=np.int64)
    g = np.asarray(groups)
    _, first, inverse, sizes = np.unique(g, return_index=True, return_inverse=True, return_counts=True)
    order = np.argsort(first, kind="stable")  # units numbered by their first row
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    unit = rank[inverse.reshape(-1)]
    counts = np.zeros((len(order), int(y.max()) + 1 if len(y) else 1), dtype=np.int64)
    np.add.at(counts, (unit, y), 1)
    return unit, counts.argmax(1), sizes[order]


def stratified_folds(labels, k: int, seed: int = 0) -> np.ndarray:
    """Fold id (0..k-1) per row: each class's rows are shuffled with seed and dealt round-robin, so every
    fold holds each class within one row of its share. Deterministic for (labels, k, seed)."""
    labels = np.asarray(labels)
    if k < 2:
        raise PipelineError(f"cross-validation needs at least 2 folds, got {k}")
    if k > len(labels):
        raise PipelineError(f"cannot make {k} folds of {len(labels)} images")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0  # continue the deal across classes so small classes do not all start at fold 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)
    return fold


def grouped_folds(labels, k: int, seed: int = 0, groups=None) -> np.ndarray:
    """Fold id per row with every group of copies (groups: a group id per row, see group_ids) inside one
    fold, stratified by class as stratified_folds. Without copies it is stratified_folds itself (the same
    folds as before copies were grouped). With copies each class's photos are shuffled with seed, larger
    groups first, and each goes to the fold holding the fewest rows of its class, ties broken in the
    round-robin order stratified_folds deals in (for single rows it deals exactly as stratified_folds)."""
    y = np.asarray(labels)
    if groups is None or len(np.unique(groups)) == len(y):
        return stratified_folds(y, k, seed)
    unit, unit_label, sizes = units(y, groups)
    if k < 2:
        raise PipelineError(f"cross-validation needs at least 2 folds, got {k}")
    if k > len(sizes):
        raise PipelineError(f"cannot make {k} folds of {len(sizes)} distinct images ({len(y)} rows: copies of one "
                            "photo stay in one fold)")
    rng = np.random.default_rng(seed)
    unit_fold = np.empty(len(sizes), dtype=np.int64)
    offset = 0
    for c in np.unique(unit_label):
        members = np.flatnonzero(unit_label == c)
        members = members[rng.permutation(len(members))]
        members = members[np.argsort(-sizes[members], kind="stable")]
        load = [0] * k
        for u in members.tolist():
            f = min(range(k), key=lambda f: (load[f], (f - offset) % k))
            unit_fold[u] = f
            load[f] += int(sizes[u])
        offset += len(members)
    return unit_fold[unit]
