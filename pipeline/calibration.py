"""Calibrated probabilities: one temperature fitted where no training or choice looked, and the numbers
that show whether a probability can be trusted (expected calibration error, reliability, coverage).

The temperature T divides the head's logits (softmax(z / T)); it never changes which class wins. It is
fitted by minimising the negative log-likelihood of the out-of-fold predictions on train that the
recipe's cross-validation already made (each row predicted by a head that never saw it), so val and test
stay untouched by it and their calibration error is an honest reading (Guo et al. 2017, "On Calibration
of Modern Neural Networks", section 4.2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

BINS = 15
T_RANGE = (0.05, 20.0)  # a temperature outside means the fit has no signal (e.g. every row right)
COVERAGE_P = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / T) at the true labels."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(1)) + m[:, 0]
    return float((lse - z[np.arange(len(labels)), labels]).mean()) if len(labels) else 0.0


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in T_RANGE minimising nll(logits, labels, T). The NLL is convex in the inverse temperature b
    (a log-sum-exp of b * z minus a linear term), so its derivative mean(E_p[z] - z_y) rises with b and
    bisection on its sign finds the minimum; deterministic, no optimizer settings."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if not len(y):
        return 1.0
    zy = z[np.arange(len(y)), y]

    def slope(b: float) -> float:
        p = softmax(z * b)
        return float(((p * z).sum(1) - zy).mean())

    lo, hi = np.log(1 / T_RANGE[1]), np.log(1 / T_RANGE[0])
    if slope(np.exp(lo)) >= 0:
        return T_RANGE[1]
    if slope(np.exp(hi)) <= 0:
        return T_RANGE[0]
    for _ in range(60):
        mid = (lo + hi) / 2
        if slope(np.exp(mid)) > 0:
            hi = mid
        else:
            lo = mid
    return float(1 / np.exp((lo + hi) / 2))


def _bin_index(confidence: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins over [0, 1], each (low, high] (the first also takes 0), as Guo et al."""
    return np.clip(np.ceil(np.asarray(confidence, dtype=np.float64) * bins).astype(np.int64) - 1, 0, bins - 1)


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per bin: its edges, how many predictions fell in it, their mean confidence and their accuracy
    (empty bins included, with n 0 and no means)."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    idx = _bin_index(conf, bins)
    n = np.bincount(idx, minlength=bins)
    sc = np.bincount(idx, weights=conf, minlength=bins)
    sa = np.bincount(idx, weights=ok, minlength=bins)
    out = []
    for b in range(bins):
        row = {"low": b / bins, "high": (b + 1) / bins, "n": int(n[b])}
        if n[b]:
            row.update(confidence=float(sc[b] / n[b]), accuracy=float(sa[b] / n[b]))
        out.append(row)
    return out


def ece(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> float:
    """Expected calibration error: sum over bins of (share of predictions) * |accuracy - mean confidence|."""
    total = len(confidence)
    if not total:
        return 0.0
    return float(sum(r["n"] / total * abs(r["accuracy"] - r["confidence"])
                     for r in reliability(confidence, correct, bins) if r["n"]))


def ece_floor(confidence: np.ndarray, bins: int = BINS, draws: int = 1000, seed: int = 0) -> dict:
    """The expected calibration error a perfectly calibrated model would show on these photos: each
    prediction right with probability equal to its confidence, drawn `draws` times (seeded). On a few hundred
    photos it is not small (about 0.03 for 153 photos at 93% accuracy), so an ECE near it is noise, not
    miscalibration. Returns its median and 95th percentile."""
    conf = np.asarray(confidence, dtype=np.float64)
    if not len(conf):
        return {"median": 0.0, "p95": 0.0, "draws": 0}
    onehot = np.zeros((len(conf), bins))
    onehot[np.arange(len(conf)), _bin_index(conf, bins)] = 1.0
    sc = conf @ onehot  # (bins,) confidence summed per bin
    rng = np.random.default_rng(seed)
    per = max(1, 4_000_000 // len(conf))  # draws per chunk: bounded memory on big splits
    out = []
    for a in range(0, draws, per):
        right = (rng.random((min(per, draws - a), len(conf))) < conf).astype(np.float64)
        out.append(np.abs(right @ onehot - sc).sum(1) / len(conf))
    e = np.concatenate(out)
    return {"median": float(np.median(e)), "p95": float(np.percentile(e, 95)), "draws": int(draws)}


def coverage(confidence: np.ndarray, correct: np.ndarray, thresholds=COVERAGE_P) -> list[dict]:
    """Per minimum confidence P: the share of photos kept (probability >= P), how many, their accuracy
    (None when none is kept). What --min-confidence P leaves to a person is the rest."""
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    out = []
    for p in thresholds:
        kept = conf >= p
        k = int(kept.sum())
        out.append({"min_confidence": float(p), "kept": k / len(conf) if len(conf) else 0.0, "n_kept": k,
                    "accuracy": float(ok[kept].mean()) if k else None})
    return out


@dataclass
class Calibration:
    """What a run keeps: the temperature for model.pt (None: not fitted), metrics.json's record, report lines."""

    temperature: float | None
    record: dict
    lines: list[str] = field(default_factory=list)


def calibrate(fit_logits: np.ndarray | None, fit_labels: np.ndarray | None, fit_on: str,
              splits: dict[str, tuple[np.ndarray, np.ndarray]], why_not: str = "") -> Calibration:
    """Fit T on (fit_logits, fit_labels) when given, keep it only if it lowers their calibration error as
    well as their NLL (else T = 1: never worse than uncalibrated there), then measure every split in
    splits ({name: (logits, labels)}, val first) before and after."""
    t = None
    if fit_logits is not None and len(fit_labels):
        y = np.asarray(fit_labels)
        cand = fit_temperature(fit_logits, y)
        before, after = (_confidence_correct(fit_logits, y, tt) for tt in (1.0, cand))
        if cand in T_RANGE:  # the fit ran to an end of the range: e.g. every out-of-fold prediction right
            why_not = f"the fit ran to the end of its range (T {cand:g}: {no_signal(fit_logits, y, cand)}), nothing to fit"
        elif ece(*after) <= ece(*before) and nll(fit_logits, y, cand) <= nll(fit_logits, y):
            t = cand
        else:
            why_not = "a temperature fitted there did not lower its calibration error"
    temp = t if t is not None else 1.0
    rec: dict = {"temperature": temp, "fitted": t is not None, "fit_on": fit_on if t is not None else None,
                 "bins": BINS, "ece": {}, "nll": {}, "mean_confidence": {}, "accuracy": {},
                 "reliability": {}, "reliability_before": {}, "coverage": {}, "ece_floor": {}}
    if t is None:
        rec["not_fitted"] = why_not
    for name, (logits, labels) in splits.items():
        y = np.asarray(labels)
        if not len(y):
            continue
        cb, ok = _confidence_correct(logits, y, 1.0)
        ca, _ = _confidence_correct(logits, y, temp)
        rec["ece"][name] = {"before": ece(cb, ok), "after": ece(ca, ok)}
        rec["nll"][name] = {"before": nll(logits, y), "after": nll(logits, y, temp)}
        rec["mean_confidence"][name] = {"before": float(cb.mean()), "after": float(ca.mean())}
        rec["accuracy"][name] = float(ok.mean())
        rec["reliability"][name] = reliability(ca, ok)
        rec["reliability_before"][name] = reliability(cb, ok)
        rec["coverage"][name] = coverage(ca, ok)
        rec["ece_floor"][name] = ece_floor(ca)
    return Calibration(t, rec, report_lines(rec))


def no_signal(logits: np.ndarray, labels: np.ndarray, temperature: float) -> str:
    """What left a temperature fit nothing to work with, in words: the rows' logits all alike (the features
    tell no photo from another), or every prediction right, or every one wrong, or else what the end of the
    range says (the highest T: confidence tells nothing about which are right; the lowest: the wrong ones are
    barely wrong)."""
    z = np.asarray(logits, dtype=np.float64)
    right = z.argmax(1) == np.asarray(labels)
    if len(z) > 1 and float(np.ptp(z, axis=0).max()) <= 1e-6 * max(1.0, float(np.abs(z).max())):
        return ("every out-of-fold prediction is the same whatever the photo: the features carry no information "
                "that tells the photos apart (constant or identical rows)")
    if right.all():
        return "every out-of-fold prediction right"
    if not right.any():
        return "every out-of-fold prediction wrong"
    how = "their confidence no guide to which" if temperature >= T_RANGE[1] else "the wrong ones barely wrong"
    return f"{right.mean():.0%} of the out-of-fold predictions right, {how}"


def _confidence_correct(logits, labels, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    p = softmax(logits, temperature)
    return p.max(1), p.argmax(1) == np.asarray(labels)


def report_lines(rec: dict) -> list[str]:
    """report.txt's calibration block: how T was fitted, ECE before -> after per split, a coverage table."""
    if rec["fitted"]:
        lines = [f"calibration: temperature {rec['temperature']:.3f} fitted on {rec['fit_on']}; predict and "
                 "export use it (it never changes the predicted class)"]
    else:
        lines = [f"calibration: none ({rec.get('not_fitted', '')}); probabilities are the head's own"]
    eces = ", ".join(f"{s} {v['before']:.4f} -> {v['after']:.4f}" for s, v in rec["ece"].items())
    if eces:
        lines.append(f"expected calibration error ({rec['bins']} bins), before -> after: {eces}")
        floors = ", ".join(f"{s} {v['median']:.4f} (95% <= {v['p95']:.4f})" for s, v in rec.get("ece_floor", {}).items())
        if floors:
            lines.append(f"ECE of a perfectly calibrated model on as many photos (its noise floor): {floors}")
    for s, rows in rec["coverage"].items():
        cells = [f"P {r['min_confidence']:.2f}: {r['kept']:.0%} kept, acc {r['accuracy']:.3f}"
                 for r in rows if r["min_confidence"] in (0.5, 0.8, 0.9, 0.95) and r["accuracy"] is not None]
        if cells:
            lines.append(f"--min-confidence on {s}: " + "; ".join(cells))
        break  # val only in the text; metrics.json and coverage.png hold every split
    return lines


def calibrate_head(weight, bias, selection, cache, splits: list[str]) -> Calibration:
    """A head run's calibration: T fitted on the chosen recipe's out-of-fold logits on train (the
    cross-validation that chose it made them), measured on the evaluated splits (val first)."""
    from .head import head_logits

    measured = {s: (head_logits(weight, bias, cache.splits[s].features), cache.splits[s].labels) for s in splits}
    oof = getattr(selection, "oof", None)
    if oof is None or oof[0] != selection.chosen:
        why = ("the tutorial's recipe makes no out-of-fold predictions; the default recipe or --folds K fits one"
               if selection is None else "the recipe kept is not the one cross-validation ranked first")
        return calibrate(None, None, "", measured, why)
    _, logits, labels = oof
    on = "train" if selection.total <= selection.n else "a stratified subset of train"
    fit_on = f"out-of-fold predictions of {selection.folds}-fold cross-validation on {on} ({len(labels)} rows)"
    return calibrate(logits, labels, fit_on, measured)
