"""Evaluation results as plain dicts: scikit-learn's classification report and confusion matrix."""
from __future__ import annotations

import numpy as np


def preload() -> None:
    """Import scikit-learn's metrics now (~0.7 s), e.g. in the sidecar process while torch loads elsewhere."""
    import sklearn.metrics  # noqa: F401


def evaluate_predictions(y_true, y_pred, class_names: list[str]) -> dict:
    """{'accuracy', 'classification_report' (sklearn dict), 'report_text', 'confusion_matrix'}."""
    from sklearn.metrics import classification_report, confusion_matrix  # here: a 0.7 s import

    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    labels = list(range(len(class_names)))
    return {
        "n": int(len(y_true)),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
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
        "classification_report": {k: v["classification_report"] for k, v in evaluations.items()},
        "confusion_matrix": {k: v["confusion_matrix"] for k, v in evaluations.items()},
    }


def report_text(evaluations: dict[str, dict], best_val_acc: float, best_epoch: int) -> str:
    """The text of report.txt: one sklearn report per evaluated split."""
    parts = [f"best val acc {best_val_acc:.4f} at epoch {best_epoch}\n"]
    for split, ev in evaluations.items():
        parts.append(f"== {split}: {ev['n']} images, accuracy {ev['accuracy']:.4f} ==\n{ev['report_text']}")
    return "\n".join(parts)
