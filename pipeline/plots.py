"""The tutorial's pictures, as files: curves.png, confusion.png, predictions.png, and the preview grid.
Plots only format results that the stages computed."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import IMAGENET_MEAN, IMAGENET_STD, load_rgb  # noqa: E402
from .fsio import atomic_output  # noqa: E402


def _save(fig, path: Path) -> None:
    try:
        with atomic_output(path, suffix=Path(path).suffix) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)


def curves_png(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", a), ("acc", b)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="val")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
        ax.grid(alpha=0.3)
    a.set_title("loss per epoch")
    b.set_title("accuracy per epoch")
    _save(fig, path)


def confusion_png(matrix: list[list[int]], class_names: list[str], path: Path, title: str = "val") -> None:
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.2 * len(class_names) + 3, 1.2 * len(class_names) + 2))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({title})")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="white" if m[i, j] > m.max() / 2 else "black")
    _save(fig, path)


def _spread(indices: np.ndarray, k: int) -> list[int]:
    """k indices evenly spaced over the list (so every class of a sorted val set shows up)."""
    if k <= 0 or len(indices) == 0:
        return []
    pos = np.linspace(0, len(indices) - 1, num=min(k, len(indices))).round().astype(int)
    return [int(indices[p]) for p in pos]


def pick_examples(y_true, y_pred, n: int = 8) -> list[int]:
    """Up to n indices: wrong predictions (up to half) and correct ones, each spread over the set."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    wrong = _spread(np.flatnonzero(y_true != y_pred), n // 2)
    right = _spread(np.flatnonzero(y_true == y_pred), n - len(wrong))
    return sorted(wrong + right)


def _thumb(path: Path, size: int = 224):
    try:
        img = load_rgb(path)
    except ValueError:
        return None
    img.thumbnail((size, size))
    return np.asarray(img)


def predictions_png(image_paths: list[Path], y_true, y_pred, class_names: list[str], path: Path) -> None:
    """The tutorial's visualize_model: val images titled with the prediction, wrong ones in red."""
    idx = pick_examples(y_true, y_pred)
    cols = 4
    rows = max(1, -(-len(idx) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, idx):
        img = _thumb(image_paths[i])
        if img is not None:
            ax.imshow(img)
        else:
            ax.text(0.5, 0.5, "image not found", ha="center", va="center")
        ok = y_true[i] == y_pred[i]
        title = f"predicted: {class_names[y_pred[i]]}" + ("" if ok else f"\nWRONG (true: {class_names[y_true[i]]})")
        ax.set_title(title, color="black" if ok else "red", fontsize=10)
    _save(fig, path)


def images_grid_png(batch, titles: list[str], path: Path, cols: int = 4) -> None:
    """A grid of normalised image tensors (N,3,H,W) with titles (the tutorial's imshow of a batch)."""
    x = batch.numpy().transpose(0, 2, 3, 1) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    x = np.clip(x, 0, 1)
    rows = max(1, -(-len(x) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t in zip(axes.flat, x, titles):
        ax.imshow(img)
        ax.set_title(t, fontsize=10)
    _save(fig, path)


def run_plots(out: str | Path, metrics: dict, image_paths: list[Path], y_true, y_pred, split: str) -> None:
    out = Path(out)
    curves_png(metrics["history"], out / "curves.png")
    confusion_png(metrics["confusion_matrix"][split], metrics["class_names"], out / "confusion.png", split)
    predictions_png(image_paths, list(y_true), list(y_pred), metrics["class_names"], out / "predictions.png")


def head_run_plots(out, metrics: dict, cache, val_pred: list[int], split: str) -> None:
    data_dir = Path(json.loads(cache.attrs["config"])["data_dir"])
    sp = cache.splits[split]
    run_plots(out, metrics, [data_dir / p for p in sp.paths], sp.labels.tolist(), val_pred, split)
