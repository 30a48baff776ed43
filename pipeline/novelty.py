"""How unlike its training photos a photo is, in the backbone's feature space: the novelty score that lets
a head run say "unknown" for a photo of none of its classes.

The score (chosen by benchmarks/unknown_vs_peers.py on real EfficientNet-Lite0 features, digits with
classes held out and ants/bees against digits) is a relative Mahalanobis distance on L2-normalised
features: the squared distance to the nearest class mean under the classes' shared covariance, minus
RELATIVE_WEIGHT times the squared distance to the mean of all train photos under their own covariance.
The relative term (Ren et al., 2021) removes what every photo of the domain shares and is what tells a
held-out digit from the known ones; kept whole it cancels for photos far from every train photo (a digit
is as far from the ants' mean as from each class mean), so 3% of the class distance is kept
(RELATIVE_WEIGHT 0.97), which keeps far photos far.

Scale: novelty = (raw - median) / (q95 - median) of out-of-fold train scores (each train photo scored by
a model fitted without its fold, copies kept in one fold), so 0 is a typical training photo and 1.0 is
the default threshold, passed by 95% of held-in known photos. What a run keeps is bounded whatever its
size: C x D class means, two D x D whitening matrices, two D means and 101 quantiles (1,280-d Lite0
features: 13 MB as float32, 100,000 rows or 100).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .text import printable

RELATIVE_WEIGHT = 0.97  # share of the all-photos distance taken off the class distance (see above)
SHRINK = 0.1  # covariances + SHRINK x the within-class mean eigenvalue x I: 244 rows of 1,280-d features are rank-deficient
PASS_SHARE = 0.95  # held-in known photos that pass the default threshold
MIN_ROWS = 10  # fewer train rows than this: no novelty model (a covariance of nothing)
FOLDS = 10
OOF_ROWS = 4000  # out-of-fold scores that set the scale and the threshold (see _scored_rows)
METHOD = "relative-mahalanobis/1"  # what a run records; another value is refused on load
ARRAYS = ("basis", "class_means", "whiten", "global_mean", "global_whiten", "quantiles")
NUMBERS = ("ridge", "center", "scale", "threshold", "relative_weight")


@dataclass
class NoveltyModel:
    """Everything scoring needs (float32 arrays). With fewer train rows N than feature dimensions D,
    both covariances live in the rows' span (k = N dimensions, an orthonormal basis) plus ridge x I
    outside it, so the model is computed and kept in k dimensions, exactly: outside the span a photo's
    squared distance is |its part there|^2 / ridge in both terms."""

    basis: np.ndarray  # (D, k) orthonormal basis of train's span; (0, 0): all of R^D (k = D)
    class_means: np.ndarray  # (C, k) whitened class means (classes with train rows only)
    whiten: np.ndarray  # (k, k): ||(p - mu_c) @ whiten||^2 is the squared class distance in the span
    global_mean: np.ndarray  # (k,) whitened mean of all train photos
    global_whiten: np.ndarray  # (k, k)
    ridge: float  # the covariances' ridge (outside the span: distance^2 = |part|^2 / ridge)
    center: float = 0.0  # median of out-of-fold raw scores
    scale: float = 1.0  # q95 - median of out-of-fold raw scores
    quantiles: np.ndarray | None = None  # (101,) out-of-fold novelty at 0%, 1%, ... 100%
    threshold: float = 1.0  # novelty above this: unknown
    relative_weight: float = RELATIVE_WEIGHT

    def raw(self, X) -> np.ndarray:
        Z = _unit_rows(X)
        P, outside = _in_span(Z, self.basis)
        A = P @ self.whiten
        d2 = (A ** 2).sum(1)[:, None] - 2 * A @ self.class_means.T + (self.class_means ** 2).sum(1)[None]
        G = P @ self.global_whiten - self.global_mean
        w = self.relative_weight
        return d2.min(1) - w * (G ** 2).sum(1) + (1 - w) * outside / self.ridge

    def score(self, X) -> np.ndarray:
        """(N,) novelty of feature rows: 0 typical of train, 1.0 the default threshold, higher = stranger."""
        return (self.raw(X) - self.center) / self.scale

    def pass_share(self, threshold: float) -> float:
        """Share of held-in (out-of-fold) train photos whose novelty is at most threshold."""
        q = self.quantiles
        return float(np.interp(threshold, q, np.linspace(0, 1, len(q)), left=0.0, right=1.0))

    def record(self) -> dict:
        """For model.pt: plain tensors and numbers (loadable with weights_only=True)."""
        import torch

        return {**{k: torch.from_numpy(getattr(self, k)) for k in ARRAYS},
                **{k: float(getattr(self, k)) for k in NUMBERS}, "method": METHOD}


def _unit_rows(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _in_span(Z: np.ndarray, basis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coordinates of unit rows in the basis (N, k), squared norm of their part outside it (N,))."""
    if basis.size == 0:
        return Z, np.zeros(len(Z))
    P = Z @ basis
    return P, np.maximum(1.0 - (P ** 2).sum(1), 0.0)


def _span_basis(Z: np.ndarray) -> np.ndarray:
    """An orthonormal basis (D, N) of the span of N < D rows, or (0, 0) when N >= D (all of R^D)."""
    n, d = Z.shape
    if n >= d:
        return np.zeros((0, 0))
    q, _ = np.linalg.qr(Z.T)  # D x N; columns beyond the rank still orthonormal: a superset span is exact too
    return q


def _cholesky(cov: np.ndarray, ridge: float) -> np.ndarray:
    """Lower L with L L^T = cov + ridge x I."""
    from scipy.linalg import cholesky

    return cholesky(cov + np.eye(len(cov)) * ridge, lower=True)


@dataclass
class _Sums:
    """Sufficient statistics of rows (coordinates in the span): the Gram matrix, per-class counts and sums.
    A fold's complement is the whole minus the fold, so K out-of-fold fits cost one pass over the rows."""

    gram: np.ndarray  # (k, k) sum of p p^T
    counts: np.ndarray  # (C,)
    sums: np.ndarray  # (C, k)

    @staticmethod
    def of(P: np.ndarray, idx: np.ndarray, classes: int) -> "_Sums":
        sums = np.zeros((classes, P.shape[1]))
        np.add.at(sums, idx, P)
        return _Sums(P.T @ P, np.bincount(idx, minlength=classes).astype(np.float64), sums)

    def __sub__(self, o: "_Sums") -> "_Sums":
        return _Sums(self.gram - o.gram, self.counts - o.counts, self.sums - o.sums)

    def factors(self, dim: int) -> "_Factors":
        """dim: the features' full dimension D (the ridge is SHRINK x the mean eigenvalue over all D)."""
        has = self.counts > 0
        n, means = self.counts.sum(), self.sums[has] / self.counts[has, None]
        total = self.sums.sum(0)
        within = (self.gram - (self.sums[has].T / self.counts[has]) @ self.sums[has]) / n
        around_all = (self.gram - np.outer(total, total) / n) / n
        ridge = max(np.trace(within) / dim, 1e-12) * SHRINK  # one ridge for both: the same metric's scale
        return _Factors(means, _cholesky(within, ridge), total / n, _cholesky(around_all, ridge), ridge)


@dataclass
class _Factors:
    """A fitted model before it is made into whitening matrices: means and Cholesky factors in the span."""

    means: np.ndarray  # (C, k) class means
    chol: np.ndarray  # (k, k) of the shared within-class covariance + ridge
    center: np.ndarray  # (k,) mean of all rows
    chol_all: np.ndarray  # (k, k) of their covariance + ridge
    ridge: float

    def raw(self, P: np.ndarray, outside: np.ndarray, weight: float = RELATIVE_WEIGHT) -> np.ndarray:
        from scipy.linalg import solve_triangular

        A = solve_triangular(self.chol, P.T, lower=True)  # (k, N): L^-1 p
        M = solve_triangular(self.chol, self.means.T, lower=True)  # (k, C)
        d2 = (A ** 2).sum(0)[:, None] - 2 * A.T @ M + (M ** 2).sum(0)[None]
        G = solve_triangular(self.chol_all, (P - self.center).T, lower=True)
        return d2.min(1) - weight * (G ** 2).sum(0) + (1 - weight) * outside / self.ridge

    def model(self, basis: np.ndarray) -> NoveltyModel:
        from scipy.linalg import solve_triangular

        eye = np.eye(len(self.chol))
        W = solve_triangular(self.chol, eye, lower=True).T  # ||(p - mu) W||^2 = (p - mu)^T cov^-1 (p - mu)
        Wg = solve_triangular(self.chol_all, eye, lower=True).T
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        return NoveltyModel(f32(basis), f32(self.means @ W), f32(W), f32(self.center @ Wg), f32(Wg), self.ridge)


def _fit_with_oof(X, y, folds: np.ndarray) -> tuple[NoveltyModel, np.ndarray]:
    """The model fitted on every row, and each row's raw score from the factors of the other folds.

    The factorisations (QR, 22 Choleskys, triangular solves) run on one BLAS thread: OpenBLAS's threads
    beside other busy processes made a 850 x 850 Cholesky 20x slower (283 ms vs 14 ms, 2 loaded cores).
    The Gram products, the one part that grows with the rows, keep every thread."""
    from threadpoolctl import threadpool_limits

    Z = _unit_rows(X)
    with threadpool_limits(1):
        basis = _span_basis(Z)
    P, outside = _in_span(Z, basis)  # outside: 0 for train rows (rounding aside)
    _, idx = np.unique(np.asarray(y), return_inverse=True)
    C = int(idx.max()) + 1
    parts = {f: _Sums.of(P[folds == f], idx[folds == f], C) for f in np.unique(folds)}
    whole = _Sums(sum(p.gram for p in parts.values()), sum(p.counts for p in parts.values()),
                  sum(p.sums for p in parts.values()))
    scored = _scored_rows(folds)
    raw = np.full(len(Z), np.nan)
    with threadpool_limits(1):
        for f, part in parts.items():
            held = scored[folds[scored] == f]
            raw[held] = (whole - part).factors(Z.shape[1]).raw(P[held], outside[held])
        return whole.factors(Z.shape[1]).model(basis), raw[scored]


def _scored_rows(folds: np.ndarray) -> np.ndarray:
    """The rows whose out-of-fold score sets the scale: all of them up to OOF_ROWS, else the first rows of
    each fold in turn (OOF_ROWS in all: the 95th percentile of 4,000 scores is within about +-0.7 points
    of share; scoring every one of 100,000 rows would cost as much as two more passes over train)."""
    if len(folds) <= OOF_ROWS:
        return np.arange(len(folds))
    per = -(-OOF_ROWS // len(np.unique(folds)))
    return np.sort(np.concatenate([np.flatnonzero(folds == f)[:per] for f in np.unique(folds)]))


def fit_novelty(X, y, folds: np.ndarray | None = None, threshold: float = 1.0) -> NoveltyModel | None:
    """The novelty model of a head's train features X (N, D) and labels y, scaled on out-of-fold scores
    (folds: a fold id per row, copies of one photo in one fold); None when there are too few rows."""
    X = np.asarray(X)
    if len(X) < MIN_ROWS or (folds is not None and len(np.unique(folds)) < 2):
        return None
    if folds is None:
        folds = np.arange(len(X)) % FOLDS
    m, raw = _fit_with_oof(X, y, folds)
    m.center = float(np.median(raw))
    m.scale = float(max(np.quantile(raw, PASS_SHARE) - m.center, 1e-12))
    m.quantiles = np.quantile((raw - m.center) / m.scale, np.linspace(0, 1, 101)).astype(np.float32)
    m.threshold = float(threshold)
    return m


class NoveltyRecordError(ValueError):
    """A run's novelty record does not hold together (a tampered or foreign model.pt)."""


def from_record(rec: dict | None, feature_dim: int | None = None, classes: int | None = None) -> NoveltyModel | None:
    """The model a run recorded (None: a run made before novelty existed, or without one). A record whose
    parts do not fit together (or not the backbone's feature size, or more class means than the run has
    classes) raises NoveltyRecordError."""
    if rec is None:
        return None
    if not isinstance(rec, dict):
        raise NoveltyRecordError(f"the novelty record is a {type(rec).__name__}, not a mapping")
    try:
        if rec.get("method") != METHOD:
            raise NoveltyRecordError(f"method {printable(repr(rec.get('method')))} is not {METHOD!r}")
        raw = {k: np.asarray(rec[k]) for k in ARRAYS}
        nums = {k: float(rec[k]) for k in NUMBERS}
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise NoveltyRecordError(f"unreadable novelty record ({printable(str(e))})") from None
    odd = [k for k, v in raw.items() if v.dtype.kind != "f"]
    if odd:
        raise NoveltyRecordError(f"novelty arrays {', '.join(odd)} are not real floating point")
    a = {k: v.astype(np.float32) for k, v in raw.items()}
    if not _shapes_fit(a, feature_dim) or (classes is not None and not 1 <= len(a["class_means"]) <= classes):
        raise NoveltyRecordError(f"novelty arrays of shapes {[v.shape for v in a.values()]} do not fit together"
                                 + (f" or the backbone's {feature_dim} features" if feature_dim else "")
                                 + (f" and {classes} classes" if classes else ""))
    if not all(np.isfinite(v).all() for v in a.values()) or not all(np.isfinite(list(nums.values()))) \
            or nums["scale"] <= 0 or nums["ridge"] <= 0:
        raise NoveltyRecordError("novelty record holds non-finite numbers or a scale or ridge <= 0")
    return NoveltyModel(**a, **nums)


def _shapes_fit(a: dict, feature_dim: int | None) -> bool:
    k = a["whiten"].shape[0] if a["whiten"].ndim == 2 else -1
    b = a["basis"]
    d = k if b.size == 0 else (b.shape[0] if b.ndim == 2 else -1)
    return (a["whiten"].shape == (k, k) and a["global_whiten"].shape == (k, k) and a["global_mean"].shape == (k,)
            and a["class_means"].ndim == 2 and a["class_means"].shape[1] == k and a["quantiles"].ndim == 1
            and len(a["quantiles"]) >= 2 and (b.size == 0 or b.shape == (d, k))
            and (feature_dim is None or d == feature_dim))


@dataclass
class RunNovelty:
    """What a head run keeps and says about novelty."""

    model: NoveltyModel | None
    record: dict  # metrics.json["novelty"]
    lines: list[str]  # report.txt
    scores: dict[str, np.ndarray]  # novelty of each evaluated split's photos (for the picture)

    def picture(self) -> dict | None:
        """plots.PictureJob's novelty (None: no model, no picture)."""
        return None if self.model is None else {"threshold": self.model.threshold, "scores": self.scores}


def run_novelty(X, y, folds: np.ndarray | None, evaluated: dict[str, np.ndarray]) -> RunNovelty:
    """Fit the novelty model of a head run on its train features (folds: the run's fold per row, copies
    kept together) and score each evaluated split (val, test), all known-class photos: the share flagged
    is the honest check of the 95% the threshold was set for."""
    import time

    t0 = time.perf_counter()
    m = fit_novelty(X, y, folds) if folds is not None else None
    if m is None:
        why = f"train has {len(X)} photos; novelty needs {MIN_ROWS} or more in at least 2 folds"
        return RunNovelty(None, {"method": None, "note": why}, [f"novelty: none ({why})"], {})
    scores = {s: m.score(F) for s, F in evaluated.items()}
    flagged = {s: {"flagged": int((v > m.threshold).sum()), "n": int(len(v))} for s, v in scores.items()}
    rec = {"method": METHOD, "threshold": m.threshold, "held_in_pass": m.pass_share(m.threshold),
           "held_in": "out-of-fold train", "folds": int(len(np.unique(folds))), "flagged": flagged,
           "seconds": round(time.perf_counter() - t0, 3)}
    said = ", ".join(f"{s} {f['flagged']} of {f['n']} ({f['flagged'] / max(f['n'], 1):.1%})" for s, f in flagged.items())
    lines = [f"novelty: photos above {m.threshold:.2f} are called unknown (set so that {m.pass_share(m.threshold):.0%} "
             f"of out-of-fold train photos pass); known-class photos flagged: {said}"]
    return RunNovelty(m, rec, lines, scores)
