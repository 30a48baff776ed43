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

RELATIVE_WEIGHT = 0.97  # share of the all-photos distance taken off the class distance (see above)
SHRINK = 0.1  # covariances + SHRINK x the within-class mean eigenvalue x I: 244 rows of 1,280-d features are rank-deficient
PASS_SHARE = 0.95  # held-in known photos that pass the default threshold
MIN_ROWS = 10  # fewer train rows than this: no novelty model (a covariance of nothing)
FOLDS = 10
METHOD = "relative-mahalanobis/1"  # what a run records; another value is refused on load


@dataclass
class NoveltyModel:
    """Everything scoring needs (float32 arrays; see the module docstring for the sizes)."""

    class_means: np.ndarray  # (C, D) whitened class means (classes with train rows only)
    whiten: np.ndarray  # (D, D): ||(z - mu_c) @ whiten||^2 is the squared class distance
    global_mean: np.ndarray  # (D,) whitened mean of all train photos
    global_whiten: np.ndarray  # (D, D)
    center: float = 0.0  # median of out-of-fold raw scores
    scale: float = 1.0  # q95 - median of out-of-fold raw scores
    quantiles: np.ndarray | None = None  # (101,) out-of-fold novelty at 0%, 1%, ... 100%
    threshold: float = 1.0  # novelty above this: unknown
    relative_weight: float = RELATIVE_WEIGHT

    def raw(self, X) -> np.ndarray:
        Z = _unit_rows(X) @ self.whiten  # (N, D)
        d2 = ((Z ** 2).sum(1)[:, None] - 2 * Z @ self.class_means.T + (self.class_means ** 2).sum(1)[None])
        G = _unit_rows(X) @ self.global_whiten - self.global_mean
        return d2.min(1) - self.relative_weight * (G ** 2).sum(1)

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

        return {"class_means": torch.from_numpy(self.class_means), "whiten": torch.from_numpy(self.whiten),
                "global_mean": torch.from_numpy(self.global_mean),
                "global_whiten": torch.from_numpy(self.global_whiten), "center": float(self.center),
                "scale": float(self.scale), "quantiles": torch.from_numpy(self.quantiles),
                "threshold": float(self.threshold), "relative_weight": float(self.relative_weight),
                "method": METHOD}


def _unit_rows(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)


def _cholesky(cov: np.ndarray, ridge: float) -> np.ndarray:
    """Lower L with L L^T = cov + ridge x I."""
    return np.linalg.cholesky(cov + np.eye(len(cov)) * ridge)


@dataclass
class _Sums:
    """Sufficient statistics of unit rows: the Gram matrix, per-class counts and sums. A fold's complement
    is the whole minus the fold, so K out-of-fold fits cost one pass over the rows (one N x D^2 product)."""

    gram: np.ndarray  # (D, D) sum of z z^T
    counts: np.ndarray  # (C,)
    sums: np.ndarray  # (C, D)

    @staticmethod
    def of(Z: np.ndarray, idx: np.ndarray, classes: int) -> "_Sums":
        sums = np.zeros((classes, Z.shape[1]))
        np.add.at(sums, idx, Z)
        return _Sums(Z.T @ Z, np.bincount(idx, minlength=classes).astype(np.float64), sums)

    def __sub__(self, o: "_Sums") -> "_Sums":
        return _Sums(self.gram - o.gram, self.counts - o.counts, self.sums - o.sums)

    def factors(self) -> "_Factors":
        has = self.counts > 0
        n, means = self.counts.sum(), self.sums[has] / self.counts[has, None]
        total = self.sums.sum(0)
        within = (self.gram - (self.sums[has].T / self.counts[has]) @ self.sums[has]) / n
        around_all = (self.gram - np.outer(total, total) / n) / n
        ridge = max(np.trace(within) / len(within), 1e-12) * SHRINK  # one ridge for both: the same metric's scale
        return _Factors(means, _cholesky(within, ridge), total / n, _cholesky(around_all, ridge))


@dataclass
class _Factors:
    """A fitted model before it is made into whitening matrices: means and Cholesky factors."""

    means: np.ndarray  # (C, D) class means of the unit rows
    chol: np.ndarray  # (D, D) of the shared within-class covariance
    center: np.ndarray  # (D,) mean of all unit rows
    chol_all: np.ndarray  # (D, D) of their covariance

    def raw(self, Z: np.ndarray, weight: float = RELATIVE_WEIGHT) -> np.ndarray:
        from scipy.linalg import solve_triangular

        A = solve_triangular(self.chol, Z.T, lower=True)  # (D, N): L^-1 z
        M = solve_triangular(self.chol, self.means.T, lower=True)  # (D, C)
        d2 = (A ** 2).sum(0)[:, None] - 2 * A.T @ M + (M ** 2).sum(0)[None]
        G = solve_triangular(self.chol_all, (Z - self.center).T, lower=True)
        return d2.min(1) - weight * (G ** 2).sum(0)

    def model(self) -> NoveltyModel:
        from scipy.linalg import solve_triangular

        eye = np.eye(len(self.chol))
        W = solve_triangular(self.chol, eye, lower=True).T  # ||(z - mu) W||^2 = (z - mu)^T cov^-1 (z - mu)
        Wg = solve_triangular(self.chol_all, eye, lower=True).T
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
        return NoveltyModel(f32(self.means @ W), f32(W), f32(self.center @ Wg), f32(Wg))


def _fit_with_oof(X, y, folds: np.ndarray) -> tuple["_Factors", np.ndarray]:
    """The factors fitted on every row, and each row's raw score from the factors of the other folds."""
    Z = _unit_rows(X)
    _, idx = np.unique(np.asarray(y), return_inverse=True)
    C = int(idx.max()) + 1
    parts = {f: _Sums.of(Z[folds == f], idx[folds == f], C) for f in np.unique(folds)}
    whole = _Sums(sum(p.gram for p in parts.values()), sum(p.counts for p in parts.values()),
                  sum(p.sums for p in parts.values()))
    raw = np.empty(len(Z))
    for f, part in parts.items():
        raw[folds == f] = (whole - part).factors().raw(Z[folds == f])
    return whole.factors(), raw


def fit_novelty(X, y, folds: np.ndarray | None = None, threshold: float = 1.0) -> NoveltyModel | None:
    """The novelty model of a head's train features X (N, D) and labels y, scaled on out-of-fold scores
    (folds: a fold id per row, copies of one photo in one fold); None when there are too few rows."""
    X = np.asarray(X)
    if len(X) < MIN_ROWS or (folds is not None and len(np.unique(folds)) < 2):
        return None
    if folds is None:
        folds = np.arange(len(X)) % FOLDS
    factors, raw = _fit_with_oof(X, y, folds)
    m = factors.model()
    m.center = float(np.median(raw))
    m.scale = float(max(np.quantile(raw, PASS_SHARE) - m.center, 1e-12))
    m.quantiles = np.quantile((raw - m.center) / m.scale, np.linspace(0, 1, 101)).astype(np.float32)
    m.threshold = float(threshold)
    return m


class NoveltyRecordError(ValueError):
    """A run's novelty record does not hold together (a tampered or foreign model.pt)."""


def from_record(rec: dict | None, feature_dim: int | None = None) -> NoveltyModel | None:
    """The model a run recorded (None: a run made before novelty existed, or without one). A record whose
    parts do not fit together (or not the backbone's feature size) raises NoveltyRecordError."""
    if not rec:
        return None
    try:
        if rec.get("method") != METHOD:
            raise NoveltyRecordError(f"method {rec.get('method')!r} is not {METHOD!r}")
        a = {k: np.asarray(rec[k], dtype=np.float32) for k in ("class_means", "whiten", "global_mean",
                                                                "global_whiten", "quantiles")}
        nums = [float(rec[k]) for k in ("center", "scale", "threshold", "relative_weight")]
    except (KeyError, TypeError, ValueError) as e:
        raise NoveltyRecordError(f"unreadable novelty record ({e})") from None
    d = a["whiten"].shape[0] if a["whiten"].ndim == 2 else -1
    shapes_ok = (a["whiten"].shape == (d, d) and a["global_whiten"].shape == (d, d) and a["global_mean"].shape == (d,)
                 and a["class_means"].ndim == 2 and a["class_means"].shape[1] == d and a["quantiles"].ndim == 1
                 and len(a["quantiles"]) >= 2 and (feature_dim is None or d == feature_dim))
    if not shapes_ok:
        raise NoveltyRecordError(f"novelty arrays of shapes {[v.shape for v in a.values()]} do not fit together"
                                 + (f" or the backbone's {feature_dim} features" if feature_dim else ""))
    if not all(np.isfinite(v).all() for v in a.values()) or not all(np.isfinite(nums)) or nums[1] <= 0:
        raise NoveltyRecordError("novelty record holds non-finite numbers or a scale <= 0")
    return NoveltyModel(a["class_means"], a["whiten"], a["global_mean"], a["global_whiten"], nums[0], nums[1],
                        a["quantiles"], nums[2], nums[3])


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
