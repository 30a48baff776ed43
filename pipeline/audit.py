"""The audit stage: leaked duplicates, likely label errors and outliers, from a feature cache alone.

Everything is computed from the cached features (any backbone) plus, for exact duplicates and the
pictures, the image files named in the cache:
- copies: groups of rows with the same bytes (sha256 of each file in the data folder) or the same
  features (rounded), one record per group whatever its size (linear in the rows: 20,000 copies of one
  image are one group, never 200 million pairs);
- near duplicates: pairs of images much closer to each other than to the rest of their neighbourhood
  (cosine distance of mean-centred features, relative to each image's own neighbour distances: a rule
  that holds for any backbone), within and across splits, among one row per group of copies, found block
  by block (never an N x N matrix); --dup-threshold replaces it by an absolute cosine;
- label issues: out-of-fold class probabilities of every train image from K heads trained at once
  (head.train_folds), and, with --run, val/test images scored by that run's trained head;
- outliers: mean cosine distance to the k nearest neighbours, flagged by a robust z-score.

The audit folder (--out) is written as a run folder is: under the same lock (labelled "audit"), staged and
committed at once, after every finding is computed. audit.json records the audit's other files with their size
and sha256; a later audit replaces or removes those only, and refuses a folder holding a file of the audit's
names that no audit wrote (or that changed since) before any work.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cache import read_cache

from . import PipelineError
from .fsio import atomic_write_bytes, atomic_write_json, file_record, sha256_file, unchanged
from .folds import copies_record, grouped_folds, group_ids
from .head import HeadParams, out_of_fold_proba, train_folds
from .plots import data_folder
from .runfolder import (AUDIT_LABEL, check_output_path, commit_staged, load_manifest, recover_staged, stat_files,
                        take_lock)
from .splits import FOLDERS, SplitSpec
from .text import printable


# A near pair (i, j): cosine distance d(i, j) <= NEAR_RATIO x the median distance of i to its neighbours ranked
# 2..6, and the same for j. Calibrated on the tutorial's photos with 30 edited val copies of train photos (90%
# crop, brighter, mirrored, down-up scaled, resized + JPEG q70): EfficientNet-Lite0 features put 29 of the 30
# below 0.45 and every pair of distinct photos above 0.52; random-init ResNet-18 features (where every photo
# looks alike) put 6 distinct pairs of 78,000 below it. An absolute cosine does not carry over: the same
# edited copies score 0.82-0.91 with the real backbone and >= 0.99 with the random one.
NEAR_RATIO = 0.45
NEAR_REF_RANKS = (1, 6)  # the neighbours (0-based ranks, end excluded) whose median is an image's reference


class AuditRunMismatch(PipelineError):
    """--run names a run folder whose head cannot score this cache's features."""


class AuditFolderError(PipelineError):
    """--out holds files of the audit's names that no audit wrote."""


AUDIT_FORMAT = "tlearn-audit/1"
AUDIT_JSON, REPORT = "audit.json", "report.txt"
PICTURES = ("suspects.png", "duplicates.png", "image_issues.png")  # audit_plots.DRAW draws each
LABEL_CSV = "label_issues.csv"  # every flagged label issue, for review in a spreadsheet
AUDIT_FILES = (AUDIT_JSON, REPORT, LABEL_CSV, *PICTURES)
AUDIT_STAGING = ".tlearn-audit-staging"


@dataclass
class AuditConfig:
    cache: str
    out: str
    run: str | None = None  # a train-head run folder: its head scores the val/test images
    data_dir: str | None = None  # overrides the data folder recorded in the cache
    top: int = 20  # label issues listed at most
    dup_threshold: float | None = None  # set: near pairs are those with cosine >= this (absolute, backbone-bound)
    dup_ratio: float = NEAR_RATIO  # near pair: distance <= this x each image's typical neighbour distance
    label_threshold: float = 0.5  # flag when 1 - p(given label) >= this and another class is the argmax
    outlier_z: float = 5.0  # robust z-score of the k-NN distance
    knn: int = 5
    folds: int = 5
    seed: int = 0
    pictures: bool = True
    block_rows: int = 2048  # similarity search block: memory ~ 2 x block^2 x 4 bytes
    max_pairs: int = 100_000  # more near-duplicate pairs than this means the threshold is far too low
    max_groups: int = 200  # groups of copies listed at most (audit.json stays bounded; all are counted)
    max_group_files: int = 25  # files listed per group at most (every split of the group among them)
    max_image_issues: int = 200  # photos listed per kind at most (all are counted)


@dataclass
class Rows:
    """Every row of every split, concatenated: row i is paths[i] of split splits[i]."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    paths: list[str]
    splits: list[str]
    class_names: list[str]

    def where(self, i: int) -> dict:
        return {"path": self.paths[i], "split": self.splits[i]}


@dataclass
class Audit:
    """What run_audit found; as_json() is audit.json."""

    cache: str
    data_dir: str | None
    rows: dict[str, int]
    thresholds: dict
    copies: dict = field(default_factory=dict)  # groups, files, cross_split_groups, listed
    copy_groups: list[dict] = field(default_factory=list)
    duplicates: list[dict] = field(default_factory=list)  # near pairs (not copies of each other)
    label_issues: list[dict] = field(default_factory=list)
    outliers: list[dict] = field(default_factory=list)
    image_issues: list[dict] = field(default_factory=list)  # photos not worth training on: path, split, kind, score
    image_checks: dict = field(default_factory=dict)  # rows measured, count per kind, set-wide kinds
    scored: dict = field(default_factory=dict)  # how the label issues were scored (folds, accuracy, run)
    missing_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    files: dict = field(default_factory=dict)  # {name: {"size", "sha256"}} of report.txt and the pictures
    format: str = AUDIT_FORMAT

    def as_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- inputs


def gather_rows(cache) -> Rows:
    names = list(cache.splits)
    feats = [cache.splits[s].features for s in names]
    return Rows(
        features=np.concatenate(feats).astype(np.float32, copy=False) if feats else np.zeros((0, cache.feature_dim),
                                                                                             np.float32),
        labels=np.concatenate([cache.splits[s].labels for s in names]) if names else np.zeros(0, np.int64),
        paths=[p for s in names for p in cache.splits[s].paths],
        splits=[s for s in names for _ in cache.splits[s].paths],
        class_names=cache.class_names,
    )


# --------------------------------------------------------------------------- similarity search


def unit_rows(X: np.ndarray) -> torch.Tensor:
    """Mean-centred, L2-normalised rows. Pooled CNN features are all positive, so raw cosines crowd near 1
    (random-init ResNet-18 on the ants/bees data: median pair 0.991); centring spreads them (median -0.01)."""
    X = np.asarray(X, dtype=np.float32)
    # the mean in float64 by numpy's buffered reduction: torch's mean(dtype=float64) first makes a float64
    # copy of the whole matrix (+390 MiB at 100k x 512, measured)
    mean = torch.from_numpy(X.mean(0, dtype=np.float64).astype(np.float32))
    F = torch.tensor(X)  # one copy, then in place: peak is X + F
    F.sub_(mean)
    return F.div_(F.norm(dim=1, keepdim=True).clamp_(min=1e-12))


def _merge_topk(best_s, best_i, cand_s, cand_i, k):
    s = torch.cat([best_s, cand_s], 1)
    i = torch.cat([best_i, cand_i], 1)
    top = s.topk(k, dim=1)
    return top.values, i.gather(1, top.indices)


def neighbour_search(F: torch.Tensor, k: int, threshold: float, block: int = 2048, max_pairs: int = 100_000,
                     pair_rows: np.ndarray | None = None):
    """Top-k most similar other rows of every row, and every pair (i < j) with similarity >= threshold.

    F (N,D) unit rows. Works on block x block tiles of the upper triangle, each tile updating the
    top-k of both its row and its column block: memory O(block^2 + N k), never N x N.
    pair_rows (N,) bool: pairs and neighbours only among these rows (one per group of copies; the other
    rows' top-k is left at -inf); None: all rows. threshold inf: no pairs, only the top-k.
    Returns (sims (N,k) float32 descending, idx (N,k) int64, pairs (P,3) float64 [i, j, sim]).
    """
    N = F.shape[0]
    among = None if pair_rows is None else torch.from_numpy(np.asarray(pair_rows, bool))
    k = max(0, min(k, N - 1))
    best_s = torch.full((N, k), -math.inf)
    best_i = torch.full((N, k), -1, dtype=torch.long)
    pairs: list[torch.Tensor] = []
    n_pairs = 0
    with torch.inference_mode():
        for a in range(0, N, block):
            Fa = F[a:a + block]
            for c in range(a, N, block):
                S = Fa @ F[c:c + block].T  # (ba, bc)
                if c == a:
                    S.fill_diagonal_(-math.inf)  # a row is not its own neighbour
                if among is not None:  # copies of a group's first row are neither pairs nor neighbours
                    S[~among[a:a + S.shape[0]]] = -math.inf
                    S[:, ~among[c:c + S.shape[1]]] = -math.inf
                # a tile's max first: scanning a mask of a tile without pairs costs 10x more
                ii = jj = None
                if S.amax() >= threshold:
                    ii, jj = torch.nonzero(S >= threshold, as_tuple=True)
                if ii is not None:
                    keep = (ii + a) < (jj + c)  # each pair once (the diagonal tile holds both orders)
                    ii, jj = ii[keep], jj[keep]
                if ii is not None and len(ii):
                    n_pairs += len(ii)
                    if n_pairs > max_pairs:
                        raise PipelineError(f"more than {max_pairs} pairs of images have similarity >= {threshold}: "
                                            "that threshold is far too low for these features; raise --dup-threshold")
                    pairs.append(torch.stack([(ii + a).double(), (jj + c).double(), S[ii, jj].double()], 1))
                if k:
                    kk = min(k, S.shape[1])
                    t = S.topk(kk, dim=1)
                    rows = slice(a, a + S.shape[0])
                    best_s[rows], best_i[rows] = _merge_topk(best_s[rows], best_i[rows], t.values, t.indices + c, k)
                    if c != a:
                        kk = min(k, S.shape[0])
                        t = S.T.contiguous().topk(kk, dim=1)  # topk along a strided dim is 3x slower
                        cols = slice(c, c + S.shape[1])
                        best_s[cols], best_i[cols] = _merge_topk(best_s[cols], best_i[cols], t.values,
                                                                 t.indices + a, k)
    P = torch.cat(pairs).numpy() if pairs else np.zeros((0, 3))
    return best_s.numpy(), best_i.numpy(), P


# --------------------------------------------------------------------------- findings


def exact_duplicate_groups(rows: Rows, data_dir: Path) -> tuple[list[list[int]], list[int]]:
    """Rows whose files have the same bytes (groups of >= 2), and the rows whose file is missing."""
    by_digest: dict[str, list[int]] = {}
    missing = []
    for i, p in enumerate(rows.paths):
        try:
            by_digest.setdefault(sha256_file(data_dir / p), []).append(i)
        except OSError:
            missing.append(i)
    return [g for g in by_digest.values() if len(g) > 1], missing


def nonneg(x: float, digits: int) -> float:
    """A measure that cannot be negative (1 - p, a cosine distance, an entropy), rounded: float error
    (1 - 1.0000001, -0.0 * log 1) never reads -0.0000."""
    return max(0.0, round(float(x), digits)) + 0.0


FEATURE_GRID = 1e-4  # unit-row coordinates rounded to this: rows equal after it have cosine >= 1 - D * 1e-8 / 2


def _root(parent: list[int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def copy_components(X: np.ndarray, byte_groups: list[list[int]], block: int = 4096) -> list[list[int]]:
    """Groups (>= 2 rows, each sorted) of copies: rows joined by the same file bytes or the same features
    (the cached rows, L2-normalised, rounded to FEATURE_GRID, hashed block by block; copies of one image get
    bit-identical rows from extract). Not the mean-centred rows: where copies are most of the cache, centring
    leaves them their float rounding noise only. Linear in the rows, memory O(block x D)."""
    n = X.shape[0]
    parent = list(range(n))

    def join(members) -> None:
        r0 = _root(parent, members[0])
        for m in members[1:]:
            r = _root(parent, m)
            if r != r0:
                parent[r] = r0

    buckets: dict[bytes, int] = {}
    for a in range(0, n, block):
        B = torch.from_numpy(np.asarray(X[a:a + block], np.float32))
        B = B / B.norm(dim=1, keepdim=True).clamp(min=1e-12)
        keys = torch.round(B / FEATURE_GRID).to(torch.int32).numpy()
        for off, row in enumerate(keys):
            h = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
            first = buckets.setdefault(h, a + off)
            if first != a + off:
                join([first, a + off])
    for g in byte_groups:
        join(g)
    comps: dict[int, list[int]] = {}
    for i in range(n):
        comps.setdefault(_root(parent, i), []).append(i)
    return [c for c in comps.values() if len(c) > 1]


def _spread_over_splits(rows: Rows, members: list[int]) -> list[int]:
    """Members in the order files are listed: round robin over the splits, so a capped list still shows
    every split of the group (the one val copy among 20,000 train copies is never cut)."""
    by_split: dict[str, list[int]] = {}
    for m in members:
        by_split.setdefault(rows.splits[m], []).append(m)
    order = sorted(by_split.values(), key=lambda ms: rows.splits[ms[0]])
    return [ms[i] for i in range(max(map(len, order))) for ms in order if i < len(ms)]


def copy_group_records(rows: Rows, F: torch.Tensor, comps: list[list[int]], byte_groups: list[list[int]],
                       max_groups: int, max_files: int) -> tuple[list[dict], dict]:
    """One record per group of copies, leaks across splits first, then larger groups; at most max_groups
    records of at most max_files files each. exact: every file has the same bytes (similarity 1.0);
    else the group's features are equal (similarity: the least cosine of a member to the first)."""
    byte_id = {}
    for b, g in enumerate(byte_groups):
        for m in g:
            byte_id[m] = b
    records = []
    for c in comps:
        exact = c[0] in byte_id and all(byte_id.get(m) == byte_id[c[0]] for m in c)
        sim = 1.0 if exact else round(float((F[c] @ F[c[0]]).min()), 6)
        splits: dict[str, int] = {}
        for m in c:
            splits[rows.splits[m]] = splits.get(rows.splits[m], 0) + 1
        records.append((len(splits) > 1, len(c), c, exact, sim, splits))
    records.sort(key=lambda r: (not r[0], -r[1], rows.paths[r[2][0]]))
    out = []
    for cross, count, c, exact, sim, splits in records[:max_groups]:
        listed = _spread_over_splits(rows, c)[:max_files]
        out.append({"count": count, "exact": exact, "similarity": sim, "cross_split": cross,
                    "splits": dict(sorted(splits.items())), "files": [rows.where(m) for m in listed],
                    "files_not_listed": count - len(listed)})
    summary = {"groups": len(comps), "files": sum(map(len, comps)),
               "cross_split_groups": sum(r[0] for r in records), "listed": len(out)}
    return out, summary


def neighbour_reference(sims: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
    """Each row's typical distance to its neighbourhood: the median cosine distance to its neighbours ranked
    NEAR_REF_RANKS (the nearest one is left out: it may be the copy). NaN for rows outside `rows`; None
    when too few rows have neighbours (fewer than 3 rows)."""
    lo, hi = NEAR_REF_RANKS
    hi = min(hi, int(rows.sum()) - 1, sims.shape[1])
    if hi - lo < 1:
        return None
    ref = np.full(len(sims), np.nan)
    ref[rows] = np.median(1.0 - sims[rows, lo:hi].astype(np.float64), 1)
    return ref


def relative_near_pairs(sims: np.ndarray, idx: np.ndarray, ref: np.ndarray, ratio: float) -> np.ndarray:
    """Pairs (i < j) whose distance is <= ratio x the reference of both i and j, from the top-k lists alone:
    such a j is nearer to i than i's median neighbour, so it is in i's top-k. Returns (P, 3) [i, j, sim]."""
    d = 1.0 - sims.astype(np.float64)
    with np.errstate(invalid="ignore"):
        ii, cc = np.nonzero(d <= ratio * ref[:, None])
    jj = idx[ii, cc]
    keep = jj >= 0
    ii, cc, jj = ii[keep], cc[keep], jj[keep]
    keep = d[ii, cc] <= ratio * ref[jj]
    found = {}
    for i, j, s in zip(ii[keep], jj[keep], sims[ii[keep], cc[keep]]):
        found[(min(i, j), max(i, j))] = float(s)
    return np.array([[i, j, s] for (i, j), s in sorted(found.items())], dtype=np.float64).reshape(-1, 3)


def near_pair_list(rows: Rows, near: np.ndarray, ref: np.ndarray | None = None) -> list[dict]:
    """Near pairs (i, j, sim), most suspect first: by distance relative to the two images' neighbourhoods
    (ratio; by similarity without a reference), leaks across splits first among equals."""
    out = []
    for i, j, s in near:
        i, j = int(i), int(j)
        d = {"a": rows.paths[i], "b": rows.paths[j], "a_split": rows.splits[i], "b_split": rows.splits[j],
             "similarity": round(float(s), 6), "cross_split": rows.splits[i] != rows.splits[j]}
        if ref is not None:
            d["ratio"] = round(float((1.0 - s) / max(min(ref[i], ref[j]), 1e-12)), 4)
        out.append(d)
    out.sort(key=lambda d: (d.get("ratio", 0.0), -d["similarity"], not d["cross_split"], d["a"], d["b"]))
    return out


def knn_outliers(rows: Rows, sims: np.ndarray, z_threshold: float,
                 among: np.ndarray | None = None) -> tuple[list[dict], np.ndarray]:
    """Mean cosine distance to the k nearest other images; flagged where its robust z-score
    (median / 1.4826 MAD, Iglewicz-Hoaglin) is >= z_threshold. among: the rows scored (all by default).
    Returns (flagged, most distant first), z (0 outside among)."""
    if sims.shape[1] == 0:
        return [], np.zeros(len(sims))
    among = np.ones(len(sims), bool) if among is None else np.asarray(among, bool)
    keep = np.flatnonzero(among)
    score = np.zeros(len(sims))
    score[keep] = (1.0 - sims[keep].astype(np.float64)).mean(1)
    med = np.median(score[keep])
    scale = 1.4826 * np.median(np.abs(score[keep] - med))
    if scale <= 0:
        scale = score[keep].std()
    z = np.zeros(len(sims))
    if scale > 0:
        z[keep] = (score[keep] - med) / scale
    flagged = np.flatnonzero(z >= z_threshold)
    flagged = flagged[np.argsort(-z[flagged], kind="stable")]
    return [{**rows.where(int(i)), "score": nonneg(score[i], 6), "z": round(float(z[i]), 3) + 0.0}
            for i in flagged], z


def label_issue_rows(rows: Rows, idx: np.ndarray, proba: np.ndarray, source: str) -> list[dict]:
    """Every row of idx scored by how little probability its given label gets (score = 1 - p)."""
    out = []
    for i, p in zip(idx, proba):
        lab = int(rows.labels[i])
        sug = int(np.argmax(p))
        out.append({**rows.where(int(i)), "label": rows.class_names[lab], "suggested": rows.class_names[sug],
                    "score": nonneg(1.0 - p[lab], 6), "source": source, "_flip": sug != lab})
    return out


def out_of_fold_issues(rows: Rows, cfg: AuditConfig, notes: list[str], comps=()) -> tuple[list[dict], dict]:
    """Out-of-fold scores of the train rows, each group of copies (comps) inside one fold; a note (and nothing)
    when the train split cannot be folded."""
    idx = np.flatnonzero(np.asarray(rows.splits) == "train")
    groups = group_ids(len(rows.labels), comps)[idx]
    if len(rows.class_names) < 2:
        notes.append("label issues skipped: the cache has one class")
        return [], {}
    y = rows.labels[idx]
    counts = np.bincount(y, minlength=len(rows.class_names))
    present = counts[counts > 0]
    if len(present) < 2:
        notes.append("label issues skipped: the train split has images of only one class")
        return [], {}
    photos = len(np.unique(groups))
    if photos < 2:
        notes.append(f"label issues skipped: the {len(idx)} train images are copies of one photo (same bytes or same "
                     "features); cross-validation needs at least 2")
        return [], {}
    k = int(min(cfg.folds, present.min(), photos))
    if k < 2:
        small = [rows.class_names[c] for c in np.flatnonzero(counts == 1)]
        notes.append(f"label issues skipped: class {', '.join(small)} has 1 train image; cross-validation needs "
                     "at least 2 per class")
        return [], {}
    if k < cfg.folds:
        notes.append(f"{k} folds instead of {cfg.folds}: the smallest train class has {k} images")
    folds = grouped_folds(y, k, cfg.seed, groups)
    (runs,), seconds = train_folds(rows.features[idx], y, len(rows.class_names), [HeadParams(seed=cfg.seed)], folds)
    proba = out_of_fold_proba(rows.features[idx], folds, runs)
    acc = float((proba.argmax(1) == y).mean())
    return label_issue_rows(rows, idx, proba, "out-of-fold"), {
        "folds": k, "out_of_fold_accuracy": round(acc, 6), "train_seconds": round(seconds, 4), "rows": int(len(idx)),
        "copies_in_one_fold": copies_record(groups)}


def _split_words(sp: SplitSpec) -> str:
    if sp.layout == FOLDERS:
        return "the folder's own train/ val/ split"
    test = f", test {sp.test_fraction:g}" if sp.test_fraction > 0 else ""
    return f"a flat-folder split (val {sp.val_fraction:g}{test}, split seed {sp.seed})"


def usable_run(rows: Rows, cache, run_dir: str, notes: list[str]):
    """The manifest of a train-head run whose head may score this cache's val/test rows: trained on these
    features (fingerprint), these classes, and these rows in these splits (the split's membership digest,
    which the run records from its cache): a head trained on another split of the same photos has seen
    some of this cache's val images."""
    m = load_manifest(run_dir)
    if m.kind != "head":
        raise AuditRunMismatch(f"--run {run_dir} is a {m.kind} run; audit needs a train-head run folder "
                               "(its head reads cached features)")
    if m.features.get("fingerprint") != cache.meta.fingerprint:
        raise AuditRunMismatch(f"--run {run_dir} was trained on features of another cache (fingerprint differs "
                               f"from {cache.path}); audit the cache it was trained on")
    if list(m.class_names) != list(rows.class_names):
        raise AuditRunMismatch(f"--run {run_dir} has classes {m.class_names}, the cache {rows.class_names}")
    theirs, mine = (m.split or {}).get("digest"), (cache.meta.split or {}).get("digest")
    if theirs and mine and theirs != mine:
        a, b = SplitSpec.from_record(m.split), SplitSpec.from_record(cache.meta.split)
        why = f"the run: {_split_words(a)}; this cache: {_split_words(b)}" if a != b else "other files in its splits"
        raise AuditRunMismatch(f"--run {run_dir} was trained on another split of the images ({why}): its val/test "
                               f"images are not this cache's; audit the cache it was trained on, or train a head "
                               f"on {cache.path}")
    if not (theirs and mine):
        notes.append(f"--run {run_dir} or this cache was made by an earlier version that does not record which "
                     "files are in which split: not checked that the head never saw these val/test images")
    return m


def run_head_issues(rows: Rows, m, run_dir: str) -> tuple[list[dict], dict]:
    """Val/test rows scored by the head of a run that usable_run accepted."""
    idx = np.flatnonzero(np.asarray(rows.splits) != "train")
    W, b = m.state_dict["weight"].float(), m.state_dict["bias"].float()
    with torch.inference_mode():
        proba = torch.softmax(torch.from_numpy(rows.features[idx]) @ W.T + b, 1).double().numpy()
    acc = float((proba.argmax(1) == rows.labels[idx]).mean()) if len(idx) else 0.0
    return label_issue_rows(rows, idx, proba, "run"), {"run": str(run_dir), "run_accuracy": round(acc, 6),
                                                       "run_rows": int(len(idx))}


def label_issues_csv(flagged: list[dict]) -> bytes:
    """label_issues.csv for review in a spreadsheet: path, split, given, suggested, score per flagged row. A
    cell a spreadsheet would read as a formula (=, +, -, @ first) gets a leading ' (OWASP's advice)."""
    import csv
    import io

    def cell(v):
        return "'" + v if isinstance(v, str) and v[:1] in ("=", "+", "-", "@", "\t", "\r") else v

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "split", "given", "suggested", "score"])
    for r in flagged:
        w.writerow([cell(r["path"]), cell(r["split"]), cell(r["label"]), cell(r["suggested"]), r["score"]])
    return buf.getvalue().encode()


def flagged_label_issues(scored: list[dict], threshold: float, top: int) -> list[dict]:
    """Rows whose suggested class is not their label and whose score passes threshold, worst first, top few."""
    hits = [r for r in scored if r["_flip"] and r["score"] >= threshold]
    hits.sort(key=lambda r: (-r["score"], r["split"], r["path"]))
    return [{k: v for k, v in r.items() if k != "_flip"} for r in hits[:top]]


# --------------------------------------------------------------------------- photos not worth training on

# Absolute where a person judges absolutely (measured on the tutorial's 397 photos: none passes any of these,
# but two real grayscale photos): a photo whose brightest 5% is still dark is dark in any set.
IMAGE_KINDS = ("dark", "light", "blurry", "low_information", "odd_aspect_ratio", "odd_size", "grayscale")
DARK_P95 = 0.25  # dark: 95th percentile of the luminance below this (tutorial photos: >= 0.40)
LIGHT_P50, LIGHT_P05 = 0.9, 0.4  # light: half the photo near white and even its darkest 5% light grey (<= 0.32)
BLURRY = 0.05  # blurry: Laplacian variance / luminance variance on the 224 crop (tutorial photos: >= 0.097)
LOW_ENTROPY = 2.0  # low_information: bits of the luminance histogram (tutorial photos: >= 2.65, median 7.4)
GRAYSCALE = 0.01  # grayscale: mean max-min channel spread (JPEG chroma noise of a gray photo: < 0.003)
# Relative to the set: a size or a shape is odd only beside the others
ODD_SMALL, ODD_LARGE = 0.25, 8.0  # odd_size: sqrt(width x height) below/above these x the set's median
ODD_ELONGATION = 3.0  # odd_aspect_ratio: long side / short side >= this x the set's median (and >= 3)
SET_WIDE = 0.5  # a kind that hits more than this share of the measured images is a property of the set


def gather_image_stats(cache) -> np.ndarray | None:
    """(N, FIELDS) float32 of every row (NaN: not measured), rows in gather_rows' order; None when a split
    has no record (a cache made before the measures)."""
    from .image_stats import as_rows

    if any(sp.image_stats is None for sp in cache.splits.values()):
        return None
    parts = [as_rows(sp.image_stats) for sp in cache.splits.values()]
    return np.concatenate(parts) if parts else None


def image_flags(stats: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """kind -> (rows flagged (bool, N), score (N,)) for measured rows; the score is the measure that decided."""
    from .image_stats import FIELDS

    m = {f: stats[:, k].astype(np.float64) for k, f in enumerate(FIELDS)}
    measured = ~np.isnan(stats).any(1)
    side = np.sqrt(m["width"] * m["height"])
    elong = np.maximum(m["width"], m["height"]) / np.maximum(np.minimum(m["width"], m["height"]), 1)
    med_side = np.median(side[measured]) if measured.any() else np.nan
    med_elong = np.median(elong[measured]) if measured.any() else np.nan
    rel_side = side / med_side
    with np.errstate(invalid="ignore"):
        flags = {
            "dark": (m["bright_p95"] < DARK_P95, m["bright_p95"]),
            "light": ((m["bright_p50"] >= LIGHT_P50) & (m["bright_p05"] >= LIGHT_P05), m["bright_p05"]),
            "blurry": (m["blur"] < BLURRY, m["blur"]),
            "low_information": (m["entropy"] < LOW_ENTROPY, m["entropy"]),
            "odd_aspect_ratio": (elong >= max(3.0, ODD_ELONGATION * med_elong), elong),
            "odd_size": ((rel_side < ODD_SMALL) | (rel_side > ODD_LARGE), rel_side),
            "grayscale": (m["colour"] < GRAYSCALE, m["colour"]),
        }
    return {k: (f & measured, s) for k, (f, s) in flags.items()}


def image_issue_list(rows: Rows, stats: np.ndarray | None, limit: int, notes: list[str]) -> tuple[list[dict], dict]:
    """Photos not worth training on, by kind (IMAGE_KINDS order), worst first within a kind, `limit` per kind."""
    if stats is None:
        notes.append("photos not checked (dark, light, blurry, low information, odd size or shape, grayscale): the "
                     "cache was made before extract measured them; re-extract with --force (or into a new --cache)")
        return [], {"measured": 0, "rows": len(rows.paths)}
    measured = ~np.isnan(stats).any(1)
    n = int(measured.sum())
    info = {"measured": n, "rows": len(rows.paths), "counts": {}, "set_wide": {}}
    if n < len(rows.paths):
        notes.append(f"{len(rows.paths) - n} of {len(rows.paths)} images were not measured for the photo checks "
                     "(decoded on the device, or rows reused from a cache made before the measures); "
                     "extract --force --decoder pil measures every one")
    if n == 0:
        return [], info
    out = []
    photos = np.zeros(len(rows.paths), bool)  # flagged by a kind that is listed (a photo may have several kinds)
    for kind, (flag, score) in image_flags(stats).items():
        hit = np.flatnonzero(flag)
        info["counts"][kind] = int(len(hit))
        if len(hit) > SET_WIDE * n and n >= 4:  # e.g. a set of grayscale scans: not a problem of single photos
            info["set_wide"][kind] = int(len(hit))
            notes.append(f"{kind}: {len(hit)} of {n} images, most of the set: a property of the data set, not "
                         "listed per image")
            continue
        photos |= flag
        worst_high = kind == "odd_aspect_ratio"
        order = hit[np.argsort(-score[hit] if worst_high else score[hit], kind="stable")]
        if kind == "odd_size":  # the farthest from the median first, small or large
            order = hit[np.argsort(-np.abs(np.log(score[hit])), kind="stable")]
        out += [{**rows.where(int(i)), "kind": kind, "score": nonneg(score[i], 4)} for i in order[:limit]]
    info["photos"] = int(photos.sum())
    return out, info


# --------------------------------------------------------------------------- the stage


def check_config(cfg: AuditConfig) -> None:
    if cfg.dup_threshold is not None and not -1.0 <= cfg.dup_threshold <= 1.0:
        raise PipelineError(f"--dup-threshold {cfg.dup_threshold} is not a cosine similarity (-1..1)")
    if not 0.0 <= cfg.label_threshold <= 1.0:
        raise PipelineError(f"--label-threshold {cfg.label_threshold} must be within 0..1")
    if not (math.isfinite(cfg.dup_ratio) and cfg.dup_ratio > 0):
        raise PipelineError(f"the near-duplicate ratio {cfg.dup_ratio} must be a positive number")
    if not math.isfinite(cfg.outlier_z):
        raise PipelineError(f"--outlier-z {cfg.outlier_z} is not a finite number")
    if cfg.top < 0 or cfg.knn < 1 or cfg.folds < 2:
        raise PipelineError("--top must be >= 0, --knn >= 1 and --folds >= 2")


def _written_by_audit(folder: Path) -> dict | None:
    """{name: record} of the files the folder's last audit wrote, from its audit.json; {} for an audit of an
    earlier version (no record: its report.txt, if it starts as an audit's, and pictures are taken as its own);
    None when there is no audit.json of an audit."""
    try:
        a = json.loads((folder / AUDIT_JSON).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(a, dict):
        return None
    if a.get("format") == AUDIT_FORMAT:
        return a["files"] if isinstance(a.get("files"), dict) else None
    return {} if "format" not in a and {"cache", "rows", "thresholds", "copies"} <= set(a) else None


def not_the_audits(folder: Path) -> list[str]:
    """Files of the audit's names in folder that no audit wrote, or that changed since the last one did."""
    present = [n for n in AUDIT_FILES if os.path.lexists(folder / n)]
    record = _written_by_audit(folder) if present else {}
    if record is None:
        return present
    if not record:  # an earlier version's audit
        try:
            ours = not (folder / REPORT).exists() or (folder / REPORT).read_bytes()[:9] == b"audit of "
        except OSError:
            ours = False
        return [] if ours else [REPORT]
    return [n for n in present if n != AUDIT_JSON and not unchanged(folder / n, record.get(n))]


def check_audit_folder(out: str) -> None:
    """--out is an audit's own folder: never a run folder or inside one (report.txt is a run's file too), and
    never a folder holding files of the audit's names that no audit wrote (a user's report.txt, audit.json,
    suspects.png, ...) or that were changed since."""
    check_output_path(out)
    foreign = not_the_audits(Path(out))
    if foreign:
        them = "it" if len(foreign) == 1 else "them"
        raise AuditFolderError(f"--out {out} holds {', '.join(foreign)} that no audit wrote (or changed since an "
                               f"audit wrote {them}); an audit would overwrite {them}: move {them} away or choose "
                               "another --out")


def write_audit_folder(audit: Audit, data_dir: Path | None, out: str, pictures: bool, t0: float,
                       label_csv: bytes) -> None:
    """Under the folder's lock (a run or another audit writing it is refused): checked again, then the pictures,
    report.txt, label_issues.csv and audit.json staged and committed at once. A picture that fails is a note,
    never the audit."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    with take_lock(folder, AUDIT_LABEL):
        recover_staged(folder, AUDIT_STAGING)
        check_audit_folder(out)  # again: a run or a user may have written the folder while the audit worked
        before = stat_files(folder, AUDIT_FILES)
        staging = folder / AUDIT_STAGING
        staging.mkdir()
        try:
            if pictures:
                from .audit_plots import audit_pictures

                audit.pictures, failed = audit_pictures(audit, data_dir, staging, PICTURES)
                audit.notes += failed
            audit.seconds = round(time.perf_counter() - t0, 3)
            atomic_write_bytes(staging / REPORT, report_text(audit).encode())
            atomic_write_bytes(staging / LABEL_CSV, label_csv)
            audit.files = {n: file_record(staging / n) for n in (REPORT, LABEL_CSV, *audit.pictures)}
            atomic_write_json(staging / AUDIT_JSON, audit.as_json())
            commit_staged(folder, AUDIT_STAGING, AUDIT_FILES, before)
        finally:
            recover_staged(folder, AUDIT_STAGING)  # a commit interrupted midway is finished, an unfinished one dropped


RANDOM_WEIGHTS_NOTE = ("WARNING: these features come from random backbone weights (--weights none): near duplicates, "
                       "outliers and label suggestions mean little (exact copies still hold); extract with "
                       "--weights imagenet, or --backbone efficientnet_lite0 offline")


def run_audit(cfg: AuditConfig) -> Audit:
    """Audit cfg.cache; writes report.txt, audit.json and the pictures into cfg.out; returns the findings."""
    check_config(cfg)
    check_audit_folder(cfg.out)
    t0 = time.perf_counter()
    cache = read_cache(cfg.cache, with_views=False)
    rows = gather_rows(cache)
    if len(rows.labels) == 0:
        raise PipelineError(f"cache {cfg.cache} holds no images; nothing to audit")
    data_dir, why = data_folder(cache, cfg.data_dir)
    notes: list[str] = []
    manifest = usable_run(rows, cache, cfg.run, notes) if cfg.run else None  # before any work
    audit = Audit(cache=str(cfg.cache), data_dir=str(data_dir) if data_dir else None,
                  rows={s: int(len(sp.labels)) for s, sp in cache.splits.items()},
                  thresholds={"dup_threshold": cfg.dup_threshold, "dup_ratio": cfg.dup_ratio,
                              "label_threshold": cfg.label_threshold,
                              "outlier_z": cfg.outlier_z, "knn": cfg.knn, "top": cfg.top}, notes=notes)
    if cache.meta.weights == "none":
        audit.notes.insert(0, RANDOM_WEIGHTS_NOTE)
    if data_dir is None:
        audit.notes.append(f"{why}: exact duplicates not checked, pictures without images; pass --data-dir")
        exact_groups: list[list[int]] = []
    else:
        exact_groups, missing = exact_duplicate_groups(rows, data_dir)
        audit.missing_files = [rows.paths[i] for i in missing]
        if missing:
            audit.notes.append(f"{len(missing)} of {len(rows.paths)} files named in the cache are missing from "
                               f"{data_dir}: not checked for exact duplicates (listed in audit.json missing_files)")
    F = unit_rows(rows.features)
    comps = copy_components(rows.features, exact_groups)
    firsts = np.ones(len(rows.labels), bool)  # near pairs among one row per group of copies
    for c in comps:
        firsts[c[1:]] = False
    absolute = cfg.dup_threshold is not None
    sims, idx, near = neighbour_search(F, max(cfg.knn, NEAR_REF_RANKS[1]), cfg.dup_threshold if absolute else math.inf,
                                       cfg.block_rows, cfg.max_pairs, None if firsts.all() else firsts)
    audit.copy_groups, audit.copies = copy_group_records(rows, F, comps, exact_groups, cfg.max_groups,
                                                         cfg.max_group_files)
    ref = neighbour_reference(sims, firsts)
    if not absolute and ref is not None:
        near = relative_near_pairs(sims, idx, ref, cfg.dup_ratio)
    elif not absolute:
        audit.notes.append("near duplicates skipped: they need at least 3 distinct images")
    audit.duplicates = near_pair_list(rows, near, ref)
    n_firsts = int(firsts.sum())
    if n_firsts <= cfg.knn:
        audit.notes.append(f"outliers skipped: {n_firsts} images, need more than --knn {cfg.knn}")
    else:  # one row per group of copies: copies neither hide an outlier nor count twice
        audit.outliers, _ = knn_outliers(rows, sims[:, :cfg.knn], cfg.outlier_z, firsts)
    audit.image_issues, audit.image_checks = image_issue_list(rows, gather_image_stats(cache), cfg.max_image_issues,
                                                              audit.notes)
    scored, audit.scored = out_of_fold_issues(rows, cfg, audit.notes, comps)
    if cfg.run:
        run_scored, info = run_head_issues(rows, manifest, cfg.run)
        scored += run_scored
        audit.scored.update(info)
    elif any(s != "train" for s in rows.splits):
        audit.notes.append("val/test images not scored for label issues: pass --run RUN_DIR (a train-head run "
                           "on this cache)")
    oof = audit.scored.get("out_of_fold_accuracy")
    if oof is not None and oof < 0.8:
        audit.notes.append(f"the out-of-fold heads reach only {oof:.2f} accuracy on train: their label suggestions "
                           "are weak evidence with these features")
    audit.label_issues = flagged_label_issues(scored, cfg.label_threshold, cfg.top)
    audit.scored["above_threshold"] = len(flagged_label_issues(scored, cfg.label_threshold, len(scored)))
    label_csv = label_issues_csv(flagged_label_issues(scored, cfg.label_threshold, len(scored)))
    write_audit_folder(audit, data_dir, cfg.out, cfg.pictures, t0, label_csv)
    return audit


# --------------------------------------------------------------------------- report


def _split_counts(rows: dict[str, int]) -> str:
    return ", ".join(f"{s} {n}" for s, n in rows.items())


def _more(found: list, limit: int) -> list[str]:
    return [f"  ... and {len(found) - limit} more in audit.json"] if len(found) > limit else []


def report_text(a: Audit, limit: int = 20) -> str:
    """report.txt: each finding list with its threshold, the first `limit` entries of each. Every name from the
    disk (paths, class names, folders) is escaped (text.printable): a newline or an escape code in a file or
    class name neither forges a line nor reaches the terminal."""
    P = printable
    t = a.thresholds
    lines = [f"audit of {P(a.cache)} ({_split_counts(a.rows)}; data folder {P(a.data_dir or 'not found')}) "
             f"in {a.seconds:.2f} s"] + [n for n in a.notes if n == RANDOM_WEIGHTS_NOTE]  # read first, not last
    c = a.copies
    lines.append(f"\ncopies: {c.get('groups', 0)} groups of {c.get('files', 0)} files "
                 f"({c.get('cross_split_groups', 0)} across splits); exact = the same bytes, else the same features")
    for g in a.copy_groups[:limit]:
        kind = "exact" if g["exact"] else "same features"
        leak = "  [across splits]" if g["cross_split"] else ""
        shown = ", ".join(P(f["path"]) for f in g["files"][:3])
        more = f" and {g['count'] - 3} more" if g["count"] > 3 else ""
        split_counts = ", ".join(f"{P(s)} {n}" for s, n in g["splits"].items())
        lines.append(f"  {kind} {g['similarity']:.4f}  {g['count']} files ({split_counts}): {shown}{more}{leak}")
    if c.get("groups", 0) > min(limit, len(a.copy_groups)):
        lines.append(f"  ... and {c['groups'] - min(limit, len(a.copy_groups))} more groups "
                     f"(audit.json lists {c['listed']})")
    cross = sum(d["cross_split"] for d in a.duplicates)
    rule = (f"cosine of mean-centred features >= {t['dup_threshold']} (--dup-threshold)"
            if t.get("dup_threshold") is not None else
            f"cosine distance <= {t['dup_ratio']} x each image's median distance to its 2nd-6th nearest images")
    lines.append(f"\nnear duplicates: {len(a.duplicates)} pairs ({cross} across splits); {rule}")
    for d in a.duplicates[:limit]:
        leak = "  [across splits]" if d["cross_split"] else ""
        rel = f" ratio {d['ratio']:.2f}" if "ratio" in d else ""
        lines.append(f"  near {d['similarity']:.4f}{rel}  {P(d['a'])}  <->  {P(d['b'])}{leak}")
    lines += _more(a.duplicates, limit)
    s = a.scored
    how = []
    if "folds" in s:
        how.append(f"{s['rows']} train images out-of-fold, {s['folds']} folds, accuracy {s['out_of_fold_accuracy']:.4f}"
                   + (", {rows} rows of {groups} photos with copies kept in one fold each".format(**s["copies_in_one_fold"])
                      if s.get("copies_in_one_fold", {}).get("rows") else ""))
    if "run" in s:
        how.append(f"{s['run_rows']} val/test images by the head of {P(s['run'])}, accuracy {s['run_accuracy']:.4f}")
    lines.append(f"\nlabel issues: {len(a.label_issues)} shown of {s.get('above_threshold', 0)} with score = "
                 f"1 - p(given label) >= {t['label_threshold']} and another class likelier (--top {t['top']})"
                 + (f"; scored: {'; '.join(how)}" if how else ""))
    for r in a.label_issues[:limit]:
        lines.append(f"  {r['score']:.4f}  {P(r['path'])}  given {P(r['label'])}, suggested {P(r['suggested'])}")
    lines.append(f"\noutliers: {len(a.outliers)} (mean cosine distance to {t['knn']} nearest images, robust z >= "
                 f"{t['outlier_z']})")
    for r in a.outliers[:limit]:
        lines.append(f"  z {r['z']:.1f}  distance {r['score']:.4f}  {P(r['path'])}")
    lines += _more(a.outliers, limit)
    ic = a.image_checks
    counts = ", ".join(f"{k} {v}" for k, v in ic.get("counts", {}).items() if v)
    # photos, not findings: one photo can be dark and blurry (81 findings of 60 photos read "81 listed of 60")
    lines.append(f"\nphotos not worth training on: {ic.get('photos', 0)} of {ic.get('measured', 0)} photos measured"
                 + (f" ({counts}; a photo may be of several kinds)" if counts else ""))
    for r in a.image_issues[:limit]:
        lines.append(f"  {r['kind']:16s} {r['score']:.4f}  {P(r['path'])}")
    lines += _more(a.image_issues, limit)
    if a.notes:
        lines.append("\nnotes:")
        lines += [f"  {P(n)}" for n in a.notes]
    if a.pictures:
        lines.append(f"\npictures: {', '.join(a.pictures)}")
    return "\n".join(lines) + "\n"
