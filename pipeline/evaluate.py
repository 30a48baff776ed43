"""Evaluation results as plain dicts: scikit-learn's classification report and confusion matrix, and a
95% Wilson score interval for every accuracy (with 153 val images one image is 0.65 points)."""
from __future__ import annotations

import math

import numpy as np


def preload() -> None:
    """Import scikit-learn's metrics now (~0.7 s), e.g. in the sidecar process while torch loads elsewhere."""
    import sklearn.metrics  # noqa: F401

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


def evaluate_predictions(y_true, y_pred, class_names: list[str]) -> dict:
    """{'n', 'accuracy', 'accuracy_ci', 'classification_report' (sklearn dict), 'report_text', 'confusion_matrix'}."""
    from sklearn.metrics import classification_report, confusion_matrix  # here: a 0.7 s import

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    labels = list(range(len(class_names)))
    correct = int((y_true == y_pred).sum())
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "accuracy_ci": accuracy_ci(correct, len(y_true)),
        "classification_report": classification_report(
            y_true, y_pred, labels=labels, target_names=class_names, output_dict=True, zero_division=0),
        "report_text": classification_report(
            y_true, y_pred, labels=labels, target_names=class_names, digits=4, zero_division=0),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def split_metrics(evaluations: dict[str, dict]) -> dict:
    """metrics.json fields from {split: evaluate_predictions(...)}: each keyed by split."""
    return {
        "accuracy": {k: v["accuracy"] for k, v in evaluations.items()},
        "accuracy_ci": {k: v["accuracy_ci"] for k, v in evaluations.items()},
        "classification_report": {k: v["classification_report"] for k, v in evaluations.items()},
        "confusion_matrix": {k: v["confusion_matrix"] for k, v in evaluations.items()},
    }


def report_text(evaluations: dict[str, dict], best_val_acc: float, best_epoch: int) -> str:
    """The text of report.txt: the best val accuracy, then one sklearn report per evaluated split (the
    first is val), every accuracy with its 95% interval."""
    n_val = next(iter(evaluations.values()))["n"] if evaluations else 0
    parts = [f"best val acc {format_accuracy(ci_from_accuracy(best_val_acc, n_val))} at epoch {best_epoch}\n"]
    for split, ev in evaluations.items():
        parts.append(f"== {split}: {ev['n']} images, accuracy {format_accuracy(ev['accuracy_ci'])} ==\n"
                     f"{ev['report_text']}")
    return "\n".join(parts)
