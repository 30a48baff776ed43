"""What a run folder tells its later reader: backbone and weights (random init said loudly), a tiny val split,
a model that answers one class, and metrics/report that stay small at thousands of classes."""
import json

import numpy as np
from click.testing import CliRunner

from cli import cli
from tests.synthetic_cache import blobs, write_cache
from tests.test_metrics import SHARED_KEYS


def _train_head(cache, out, *extra):
    r = CliRunner().invoke(cli, ["train-head", str(cache), "--out", str(out), "--recipe", "tutorial", *extra])
    assert r.exit_code == 0, r.output
    return r


def test_random_weights_tiny_val_and_one_class_are_said(tmp_path):
    X, y = blobs({0: 6, 1: 6}, dim=8)
    Xv = np.tile(X[y == 1].mean(0), (6, 1))  # every val row sits on the bees centre: one answer for all
    yv = np.array([0, 0, 1, 1, 1, 1])
    cache = write_cache(tmp_path / "f.h5", {"train": (X, y, [f"t{i}.jpg" for i in range(12)]),
                                            "val": (Xv, yv, [f"v{i}.jpg" for i in range(6)])}, ["ants", "bees"])
    out = tmp_path / "run"
    r = _train_head(cache, out, "--epochs", "3", "--no-plots")
    m = json.loads((out / "metrics.json").read_text())
    assert (m["backbone"], m["weights"]) == ("synthetic", "none")
    assert SHARED_KEYS <= set(m) and m["kind"] == "head"  # finetune's keys for the shared part
    assert [w.split(":")[1].strip() for w in m["warnings"]] == [
        "random weights (--weights none)", "tiny val split", "the kept model predicts one class (bees) for every val image (6 images)"]
    report = (out / "report.txt").read_text()
    assert report.startswith("backbone synthetic, weights none (random init)\nWARNING: random weights")
    assert "WARNING: tiny val split: 6 images (ants 2, bees 4)" in report
    for w in m["warnings"]:
        assert w in r.output
    shown = CliRunner().invoke(cli, ["report", str(out)])
    assert shown.exit_code == 0 and shown.output.splitlines()[:4] == report.splitlines()[:4]


def test_thousands_of_classes_keep_the_run_folder_small(tmp_path):
    """1,000 classes of one train and one val row: metrics.json held a dense 1,000 x 1,000 matrix (~3 MB)
    and report.txt a line per class; now nonzero cells and the worst classes, and every reader still works."""
    classes = 1000
    g = np.random.default_rng(0)
    centres = g.normal(0, 1, (classes, 16)).astype(np.float32)
    y = np.arange(classes)
    names = [f"class_{i:04d}" for i in range(classes)]
    cache = write_cache(tmp_path / "f.h5", {
        "train": (centres + 0.1 * g.normal(0, 1, centres.shape), y, [f"{n}/a.jpg" for n in names]),
        "val": (centres + 0.1 * g.normal(0, 1, centres.shape), y, [f"{n}/b.jpg" for n in names])}, names)
    out = tmp_path / "run"
    _train_head(cache, out, "--epochs", "1", "--batch-size", "64")
    m = json.loads((out / "metrics.json").read_text())
    cm = m["confusion_matrix"]["val"]
    assert cm["classes"] == classes and sum(c for _, _, c in cm["entries"]) == classes
    assert (out / "metrics.json").stat().st_size < 600_000
    assert len(m["classification_report"]["val"]) == classes + 3
    assert m["balanced_accuracy_ci"]["val"]["classes"] == classes
    report = (out / "report.txt").read_text()
    assert len(report.splitlines()) < 60 and f"{classes} classes: the 20 with the lowest f1-score" in report
    assert (out / "confusion.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    shown = CliRunner().invoke(cli, ["report", str(out)])
    assert shown.exit_code == 0 and shown.output.rstrip("\n") == report.rstrip("\n")
