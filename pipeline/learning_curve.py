"""Would more labels help? The kept recipe trained again on growing shares of train, scored on val.

Each share takes, per class, the first round(share x its photos) of a per-repeat shuffle of that class's
train photos (at least one; a photo present more than once comes with all its copies, see share_rows), so a
repeat's 10% lies inside its 20%, as if a team had labelled more photos of the same kind; each share is drawn
`repeats` times (all of train once). Every head is trained at once:
- the linear probe (the automatic recipe) in one shared row order, each head seeing only its share's rows of
  each batch (head.train_probe_subsets): the same number of optimizer steps as the kept head, and a batch of
  the share's rows, which is what the recipe's batch rule (probe_batch) gives a smaller train split;
- the tutorial's recipe on each share alone (head.train_subsets: its own shuffle, batch and epochs).
The last epoch is scored (val chooses nothing here either), so the all-of-train point is the kept head's
own val figure for the probe and the tutorial recipe's last epoch otherwise. Pure: arrays in, a record out.
"""
from __future__ import annotations

import time

import numpy as np

from . import PipelineError

SHARES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
REPEATS = 3
SMALL_VAL = 30  # fewer val photos: the reading says so rather than judge (as the run's own tiny-val warning)


def share_rows(labels, shares=SHARES, repeats: int = REPEATS, seed: int = 0, groups=None
               ) -> list[tuple[float, int, np.ndarray]]:
    """(share, repeat, train row indices) of every head: nested per repeat, stratified, >= 1 photo per class.
    groups (a group id per row, see folds.group_ids): a share draws photos, each with all its copies, so a
    share of 50% holds half the distinct photos (drawn by row, a train split where every photo is present
    twice would give its 50% share about three quarters of them, and the curve would misstate what labelling
    more photos adds). Without groups every row is a photo (the draw is row by row)."""
    from .folds import units

    unit, unit_label, _ = units(labels, groups)
    classes = np.unique(unit_label)
    heads = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        order = {c: np.flatnonzero(unit_label == c)[rng.permutation(int((unit_label == c).sum()))] for c in classes}
        for s in shares:
            if s >= 1.0 and r > 0:
                continue  # all of train: every repeat would draw the same rows
            take = np.concatenate([order[c][:max(1, int(round(s * len(order[c]))))] for c in classes])
            heads.append((float(s), r, np.flatnonzero(np.isin(unit, take))))  # every row of each photo taken
    return heads


def _score(pred: np.ndarray, y: np.ndarray, classes: int, metric: str) -> tuple[float, float, float]:
    """metric of pred against y with its 95% interval (accuracy: Wilson; balanced accuracy: per-class Wilson
    intervals averaged)."""
    from .metrics import balanced_accuracy_ci, confusion_record, wilson_interval

    if metric == "balanced_accuracy":
        ci = balanced_accuracy_ci(confusion_record(y, pred, classes))
        return ci["value"], ci["low"], ci["high"]
    k = int((pred == y).sum())
    lo, hi = wilson_interval(k, len(y))
    return k / max(len(y), 1), lo, hi


def learning_curve(Xtr, ytr, Xva, yva, classes: int, params, metric: str = "accuracy", class_weight=None,
                   shares=SHARES, repeats: int = REPEATS, seed: int = 0, views=None, groups=None) -> dict:
    """Train params (a ProbeParams or HeadParams) on every share x repeat of train and score each on val.
    views: the train rows' augmented views (N,K,D) the kept head drew from (the tutorial's recipe only).
    groups: a group id per train row (copies of one photo share it): shares draw photos with all their copies,
    and photos per class count distinct photos.
    Returns the record metrics.json keeps (see reading() for its sentence)."""
    from .head import train_probe_subsets, train_subsets
    from .recipe import ProbeParams

    ytr = np.asarray(ytr)
    yva = np.asarray(yva)
    if len(yva) == 0:
        raise PipelineError("the learning curve is scored on val, which has no images")
    from .folds import copies_record, units

    heads = share_rows(ytr, shares, repeats, seed, groups)
    unit = units(ytr, groups)[0]
    t0 = time.perf_counter()
    if isinstance(params, ProbeParams):
        member = np.zeros((len(ytr), len(heads)), dtype=bool)
        for h, (_, _, rows) in enumerate(heads):
            member[rows, h] = True
        W, b = train_probe_subsets(Xtr, ytr, classes, params, member, class_weight=class_weight)
    else:
        W, b = train_subsets(Xtr, ytr, classes, params, [rows for _, _, rows in heads], class_weight=class_weight,
                             views=views)
    seconds = time.perf_counter() - t0
    Xv = np.asarray(Xva, dtype=np.float32)
    present = np.unique(ytr)  # classes with train rows: photos per class are counted over these
    weight = row_weights(yva, metric)
    points, right = [], {}
    for s in sorted({s for s, _, _ in heads}):
        idx = [h for h, (s2, _, _) in enumerate(heads) if s2 == s]
        runs = []
        for h in idx:
            logits = Xv @ W[h].T + b[h]
            if np.isfinite(logits).all():
                pred = logits.argmax(1)
                value, low, high = _score(pred, yva, classes, metric)
            else:  # diverged: every photo wrong, whatever the metric
                pred, value, low, high = np.full(len(yva), -1), 0.0, 0.0, 0.0
            runs.append({"value": value, "low": low, "high": high})
            right.setdefault(s, []).append(pred == yva)
        n_rows = [len(heads[h][2]) for h in idx]
        n_photos = [len(np.unique(unit[heads[h][2]])) for h in idx]
        points.append({"share": s, "rows": int(round(np.mean(n_rows))), "photos": int(round(np.mean(n_photos))),
                       "per_class": float(np.mean(n_photos)) / max(len(present), 1),
                       "values": [r["value"] for r in runs], "mean": float(np.mean([r["value"] for r in runs])),
                       "low": float(np.mean([r["low"] for r in runs])), "high": float(np.mean([r["high"] for r in runs]))})
    record = {"metric": metric, "split": "val", "n_val": int(len(yva)), "repeats": repeats, "seed": seed,
              "recipe": "probe" if isinstance(params, ProbeParams) else "tutorial", "points": points,
              "seconds": seconds, "views": views is not None and not isinstance(params, ProbeParams),
              "classes_without_train_rows": int(classes - len(present)), "copies": copies_record(groups)}
    if len(points) > 1:
        half = min(points[:-1], key=lambda p: abs(p["share"] - points[-1]["share"] / 2))
        record["doubling"] = {"from_share": half["share"], "to_share": points[-1]["share"],
                              "gain": points[-1]["mean"] - half["mean"],
                              "se": paired_se(right[points[-1]["share"]][0], right[half["share"]], weight)}
    record["reading"] = reading(record)
    return record


def row_weights(y: np.ndarray, metric: str) -> np.ndarray:
    """Each val photo's weight in the metric: 1/n for accuracy; 1/(K * its class's count) for balanced
    accuracy (K: classes present in val), so a minority photo counts as much as its class's share."""
    y = np.asarray(y)
    if metric != "balanced_accuracy":
        return np.full(len(y), 1.0 / max(len(y), 1))
    counts = np.bincount(y)
    return 1.0 / (int((counts > 0).sum()) * counts[y])


def paired_se(full_right: np.ndarray, half_right: list[np.ndarray], weight: np.ndarray | None = None) -> float:
    """Standard error of the metric's difference between the all-of-train head and a smaller share's heads,
    scored on the same val photos (paired, as McNemar's test: only the photos one gets right and the other
    wrong carry it; each weighted as the metric weighs it, see row_weights), averaged over the share's draws.
    Far smaller than each point's own interval, which mostly reflects which photos val happens to hold."""
    n = max(len(full_right), 1)
    w = np.full(n, 1.0 / n) if weight is None else np.asarray(weight, dtype=np.float64)
    ses = []
    for h in half_right:
        d = full_right.astype(np.float64) - h.astype(np.float64)  # +1, 0 or -1 per photo
        # sum(w * d) is the mean of z = n * w * d over the photos: its variance is var(z) / n
        z = w * d
        ses.append(np.sqrt(max((z ** 2).sum() - z.sum() ** 2 / n, 0.0)))
    return float(np.mean(ses))


def reading(record: dict) -> str:
    """One line: what the last doubling of labelled photos added, against the paired noise of that difference."""
    pts = record["points"]
    full = pts[-1]
    name = record["metric"].replace("_", " ")
    if "doubling" not in record:
        return f"val {name} {full['mean']:.1%} with all of train (one share only)"
    d = record["doubling"]
    half = next(p for p in pts if p["share"] == d["from_share"])
    gain, noise = 100 * d["gain"], 200 * d["se"]
    if half["rows"] == full["rows"]:
        return (f"train is too small for a curve: every share holds the same {full['rows']} rows "
                "(at least one per class)")
    verdict = ("within noise: more photos of the same kind are unlikely to change much" if abs(gain) <= noise
               else "more labelled photos would likely help" if gain > 0 else "the smaller share scored higher")
    if record["n_val"] < SMALL_VAL:
        verdict = f"val has {record['n_val']} photos, too few to tell"
    line = (f"the last doubling ({_count(half['per_class'])} -> {_count(full['per_class'])} labelled photos per "
            f"class) changed val {name} by {gain:+.1f} points ({half['mean']:.1%} -> {full['mean']:.1%}; paired "
            f"noise +-{noise:.1f} points on the same val photos): {verdict}")
    if record.get("classes_without_train_rows"):
        line += (f"; {record['classes_without_train_rows']} class(es) have no train photos at all: the curve cannot "
                 "show what labelling them would add")
    return line


def _count(v: float) -> str:
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def table(record: dict) -> str:
    """report.txt's lines: share, photos per class, the metric's mean over repeats and its interval."""
    name = record["metric"].replace("_", " ")
    lines = [f"learning curve ({record['recipe']} recipe, {record['repeats']} draws per share, val {name}, "
             f"{record['seconds']:.2f} s):", f"  {'share':>5}  {'per class':>9}  {'mean':>7}  95% interval   draws"]
    for p in record["points"]:
        lines.append(f"  {p['share']:>5.0%}  {p['per_class']:>9.1f}  {p['mean']:>7.4f}  {p['low']:.3f}-{p['high']:.3f}"
                     f"    {' '.join(f'{v:.3f}' for v in p['values'])}")
    lines.append(record["reading"])
    return "\n".join(lines)

