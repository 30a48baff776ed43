"""train-head --learning-curve: nested stratified shares of train, the kept recipe on each, scored on val."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from pipeline.head import train_heads, train_probes, train_subsets
from pipeline.learning_curve import learning_curve, paired_se, reading, row_weights, share_rows
from pipeline.recipe import HeadParams, ProbeParams
from tests.synthetic_cache import blobs, write_cache


def train_val(n_train: int, n_val: int, classes: int = 3, spread: float = 1.0):
    """Blobs of one set of centres, split into train and val rows."""
    per = -(-(n_train + n_val) // classes)
    X, y = blobs({c: per for c in range(classes)}, dim=16, spread=spread)
    order = np.random.default_rng(7).permutation(len(y))
    tr, va = order[:n_train], order[n_train:n_train + n_val]
    return X[tr], y[tr], X[va], y[va]


def test_shares_are_nested_stratified_and_all_of_train_once():
    y = np.array([0] * 50 + [1] * 20 + [2] * 3)
    heads = share_rows(y, shares=(0.1, 0.5, 1.0), repeats=3, seed=4)
    assert [(s, r) for s, r, _ in heads] == [(0.1, 0), (0.5, 0), (1.0, 0), (0.1, 1), (0.5, 1), (0.1, 2), (0.5, 2)]
    for s, r, rows in heads:
        counts = np.bincount(y[rows], minlength=3)
        assert counts.tolist() == [round(s * 50), round(s * 20), max(1, round(s * 3))]  # every class, >= 1 row
    by = {(s, r): set(rows.tolist()) for s, r, rows in heads}
    for r in range(3):
        assert by[(0.1, r)] < by[(0.5, r)] <= set(range(len(y)))  # a repeat's 10% lies inside its 50%
    assert by[(0.5, 0)] != by[(0.5, 1)]  # repeats draw differently
    again = share_rows(y, shares=(0.1, 0.5, 1.0), repeats=3, seed=4)
    assert all(np.array_equal(a[2], b[2]) for a, b in zip(heads, again))


def test_paired_se_by_hand():
    full = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 1], dtype=bool)
    half = np.array([1, 0, 0, 1, 1, 0, 1, 1, 1, 1], dtype=bool)
    # b = 2 (full right, half wrong), c = 1: sqrt(3 - 1/10) / 10
    assert paired_se(full, [half]) == pytest.approx(np.sqrt(2.9) / 10)
    assert paired_se(full, [full]) == 0.0


def test_probe_curve_ends_at_the_kept_head_and_rises_with_labels():
    Xtr, ytr, Xva, yva = train_val(600, 300, spread=8.0)
    p = ProbeParams(lr=0.01, epochs=20, batch_size=37, weight_decay=0.01)
    rec = learning_curve(Xtr, ytr, Xva, yva, 3, p, shares=(0.05, 0.5, 1.0), repeats=2)
    assert [pt["share"] for pt in rec["points"]] == [0.05, 0.5, 1.0]
    assert [len(pt["values"]) for pt in rec["points"]] == [2, 2, 1]
    assert rec["points"][-1]["rows"] == 600 and rec["points"][0]["per_class"] == pytest.approx(10.0)
    (runs,), _ = train_probes(Xtr, ytr, 3, [p])  # the kept head: the same recipe on all of train
    kept = float(((Xva @ runs[0].weight.numpy().T + runs[0].bias.numpy()).argmax(1) == yva).mean())
    assert rec["points"][-1]["values"][0] == pytest.approx(kept, abs=1.5 / len(yva))
    assert rec["points"][0]["mean"] < rec["points"][-1]["mean"] - 0.03  # 30 rows vs 600 on noisy blobs (0.81 vs 0.86)
    for pt in rec["points"]:
        assert pt["low"] <= pt["mean"] <= pt["high"]
    d = rec["doubling"]
    assert d["from_share"] == 0.5 and d["gain"] == pytest.approx(rec["points"][2]["mean"] - rec["points"][1]["mean"])
    assert "labelled photos per class" in rec["reading"]


def test_tutorial_subsets_equal_training_each_subset_alone():
    X, y, _, _ = train_val(40, 0)
    p = HeadParams(epochs=3)
    rows = [np.arange(0, 40, 2), np.arange(40)]
    W, b = train_subsets(X, y, 3, p, rows)
    for r, w_, b_ in zip(rows, W, b):
        (alone,), _ = train_heads((X[r], y[r]), (X[:3], y[:3]), 3, [p])
        np.testing.assert_allclose(w_, alone.last_weight.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b_, alone.last_bias.numpy(), rtol=1e-5, atol=1e-6)


def test_saturated_curve_reads_within_noise():
    Xtr, ytr, Xva, yva = train_val(300, 90, spread=0.05)
    rec = learning_curve(Xtr, ytr, Xva, yva, 3, HeadParams(epochs=2), shares=(0.5, 1.0), repeats=1)
    assert rec["points"][-1]["mean"] == 1.0 and rec["doubling"]["gain"] == 0.0
    assert rec["reading"].endswith("within noise: more photos of the same kind are unlikely to change much")


def test_cli_learning_curve_writes_picture_metrics_and_report(tmp_path):
    Xtr, ytr, Xva, yva = train_val(60, 20, classes=2, spread=4.0)
    cache = write_cache(tmp_path / "c.h5", {"train": (Xtr, ytr, [f"train/{i}.jpg" for i in range(60)]),
                                             "val": (Xva, yva, [f"val/{i}.jpg" for i in range(20)])}, ["a", "b"])
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train-head", str(cache), "--out", str(out), "--learning-curve"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    curve = m["learning_curve"]
    assert [p["share"] for p in curve["points"]] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert [len(p["values"]) for p in curve["points"]] == [3] * 9 + [1]
    assert curve["n_val"] == 20 and curve["split"] == "val"
    assert (out / "learning_curve.png").stat().st_size > 1000
    report = (out / "report.txt").read_text()
    assert "learning curve (" in report and "the last doubling (" in report
    assert f"(learning curve {curve['seconds']:.2f} s more); run folder {out}" in r.output
    plain = tmp_path / "plain"
    r = CliRunner().invoke(cli, ["train-head", str(cache), "--out", str(plain)])
    assert r.exit_code == 0, r.output
    assert "learning_curve" not in json.loads((plain / "metrics.json").read_text())
    assert not (plain / "learning_curve.png").exists()


def test_views_reach_the_tutorial_heads():
    Xtr, ytr, Xva, yva = train_val(60, 30, spread=3.0)
    views = Xtr[:, None, :] + np.random.default_rng(2).normal(scale=2.0, size=(60, 2, 16)).astype(np.float32)
    p = HeadParams(epochs=3)
    rec = learning_curve(Xtr, ytr, Xva, yva, 3, p, shares=(0.5, 1.0), repeats=1, views=views)
    (kept,), _ = train_heads((Xtr, ytr), (Xva, yva), 3, [p], views=views)
    last = float(((Xva @ kept.last_weight.numpy().T + kept.last_bias.numpy()).argmax(1) == yva).mean())
    assert rec["views"] and rec["points"][-1]["values"][0] == pytest.approx(last, abs=1.5 / len(yva))
    plain = learning_curve(Xtr, ytr, Xva, yva, 3, p, shares=(0.5, 1.0), repeats=1)
    assert not plain["views"]


def test_balanced_noise_weighs_each_photo_as_the_metric_does():
    y = np.array([0] * 95 + [1] * 5)
    full = np.ones(100, dtype=bool)
    half = full.copy()
    half[97] = False  # one minority photo: 10 points of balanced accuracy, 1 point of accuracy
    w = row_weights(y, "balanced_accuracy")
    assert w[97] == pytest.approx(0.1) and w[0] == pytest.approx(1 / 190)
    assert paired_se(full, [half], w) == pytest.approx(np.sqrt(0.01 - 0.01 / 100))
    assert paired_se(full, [half], row_weights(y, "accuracy")) == pytest.approx(paired_se(full, [half]))
    # 10 points gained on one photo is within its own (balanced) noise
    rec = {"metric": "balanced_accuracy", "n_val": 100, "points": [
        {"share": 0.5, "rows": 50, "per_class": 25.0, "mean": 0.9}, {"share": 1.0, "rows": 100, "per_class": 50.0,
                                                                      "mean": 1.0}],
           "doubling": {"from_share": 0.5, "gain": 0.1, "se": paired_se(full, [half], w)}}
    assert reading(rec).endswith("within noise: more photos of the same kind are unlikely to change much")


def test_diverged_heads_score_zero_and_small_inputs_say_so():
    Xtr, ytr, Xva, yva = train_val(30, 12, spread=1.0)
    rec = learning_curve(Xtr * 1e30, ytr, Xva, yva, 3, HeadParams(epochs=2, lr=1e30), metric="balanced_accuracy",
                         shares=(0.5, 1.0), repeats=1)
    assert all(v == 0.0 for p in rec["points"] for v in p["values"])
    assert rec["reading"].endswith("val has 12 photos, too few to tell")
    one = [int(np.flatnonzero(ytr == c)[0]) for c in range(3)]  # one train row per class
    tiny = learning_curve(Xtr[one], ytr[one], Xva, yva, 3, HeadParams(epochs=1), shares=(0.5, 1.0), repeats=1)
    assert tiny["reading"] == "train is too small for a curve: every share holds the same 3 rows (at least one per class)"


def test_photos_per_class_count_only_classes_with_train_rows():
    Xtr, ytr, Xva, yva = train_val(90, 45, spread=1.0)
    keep = ytr != 2  # class 2 has val photos but no train photos
    rec = learning_curve(Xtr[keep], ytr[keep], Xva, yva, 3, HeadParams(epochs=1), shares=(0.5, 1.0), repeats=1)
    assert rec["points"][-1]["per_class"] == pytest.approx(keep.sum() / 2)
    assert rec["classes_without_train_rows"] == 1
    assert "1 class(es) have no train photos at all" in rec["reading"]
