"""95% Wilson score intervals on every reported accuracy; the report and confusion record at any class count;
the warnings a run's report carries."""
import json
import math

import numpy as np
import pytest

from cli import sweep_table
from pipeline.metrics import accuracy_ci, balanced_accuracy_ci, confusion_counts, confusion_entries, confusion_record, \
    classification_metrics, format_accuracy, run_metrics, run_report_text, run_warnings, split_metrics, weights_line, \
    wilson_interval


def test_wilson_146_of_153_by_hand():
    n, k, z = 153, 146, 1.959963984540054
    p = k / n
    centre = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
    half = z / (1 + z ** 2 / n) * math.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
    low, high = wilson_interval(k, n)
    assert low == pytest.approx(centre - half, abs=1e-12) and high == pytest.approx(centre + half, abs=1e-12)
    assert (round(low, 4), round(high, 4)) == (0.9086, 0.9777)
    assert format_accuracy(accuracy_ci(k, n)) == "0.9542 (95% CI 0.909-0.978, 146/153)"


@pytest.mark.parametrize("k, n, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table II, method 3 (score interval without
    # continuity correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_literature_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == (low, high)


def test_wilson_edges():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and round(lo, 4) == 0.8389  # all correct: still not certain
    assert accuracy_ci(0, 0) == {"low": 0.0, "high": 1.0, "correct": 0, "n": 0}


def test_reports_and_metrics_carry_the_interval():
    ev = classification_metrics([0] * 10 + [1] * 10, [0] * 10 + [1] * 7 + [0] * 3, ["a", "b"])
    assert ev["accuracy"] == 0.85 and ev["accuracy_ci"]["correct"] == 17 and ev["accuracy_ci"]["n"] == 20
    lo, hi = wilson_interval(17, 20)
    assert (ev["accuracy_ci"]["low"], ev["accuracy_ci"]["high"]) == (lo, hi)
    m = split_metrics({"val": ev})
    assert m["accuracy_ci"] == {"val": ev["accuracy_ci"]}


def test_one_report_builder_for_every_run():
    """report.txt's shared part, as train-head and finetune write it: backbone and warnings, the stage's
    header lines, the kept model's line, then per split its accuracy and balanced accuracy with intervals."""
    names = ["a", "b"]
    evs = {"val": classification_metrics([0] * 10 + [1] * 10, [0] * 10 + [1] * 7 + [0] * 3, names),
           "test": classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], names)}
    m = run_metrics("finetune", evs, val_split="val", best_val_acc=0.85, best_epoch=4, history=[], class_names=names,
                    seconds=1.0, recipe={}, n={"train": 40, "val": 20, "test": 4}, skipped=[], split=None,
                    backbone="resnet18", weights="imagenet")
    text = run_report_text(m, evs, "best val acc 0.8500 at epoch 4", ["recipe: the tutorial's"])
    lo, hi = wilson_interval(17, 20)
    b = m["balanced_accuracy_ci"]["val"]
    assert b["value"] == pytest.approx((1 + 0.7) / 2)
    assert m["warnings"] == ["WARNING: tiny val split: 20 images (a 10, b 10); one image moves the accuracy by 0.050, "
                             "so its figures say little"]
    assert text.startswith("backbone resnet18, weights imagenet (torchvision IMAGENET1K_V1)\n"
                           f"{m['warnings'][0]}\nrecipe: the tutorial's\n\n"
                           "best val acc 0.8500 at epoch 4\n\n"
                           f"== val: 20 images, accuracy 0.8500 (95% CI {lo:.3f}-{hi:.3f}, 17/20), balanced accuracy "
                           f"{b['value']:.4f} (95% CI {b['low']:.3f}-{b['high']:.3f}) ==\n"
                           f"{evs['val']['classification_report_text']}\n== test: 4 images, accuracy 0.7500")


def test_sweep_table_shows_the_interval():
    rows = [{"lr": 0.001, "best_val_acc": 146 / 153, "best_epoch": 3, "best_val_ci": accuracy_ci(146, 153)},
            {"lr": 0.01, "best_val_acc": 140 / 153, "best_epoch": 9, "best_val_ci": accuracy_ci(140, 153)}]
    lines = sweep_table(rows).splitlines()
    assert lines[0].split() == ["lr", "best_val_acc", "95%", "CI", "correct", "best_epoch"]
    assert lines[1].split() == ["0.001", "0.9542", "0.909-0.978", "146/153", "3", "<-", "best"]
    assert lines[2].split()[:4] == ["0.01", "0.9150", "0.860-0.950", "140/153"]


# --------------------------------------------------------------------------- many classes, sparse confusion

def _labels(classes: int, n: int, seed: int = 0):
    g = np.random.default_rng(seed)
    y = g.integers(0, classes, n)
    return y, np.where(g.random(n) < 0.6, y, g.integers(0, classes, n))


def test_report_equals_sklearn_for_few_classes():
    """The numpy report keeps scikit-learn's numbers and layout (a class with no images, one never predicted)."""
    from sklearn.metrics import classification_report, confusion_matrix

    y, p = _labels(7, 60, seed=3)
    y[y == 3], p[p == 5] = 4, 6
    names = [f"c{i}" for i in range(7)]
    ev = classification_metrics(y, p, names)
    ref = classification_report(y, p, labels=range(7), target_names=names, output_dict=True, zero_division=0)
    assert ev["classification_report"].keys() == ref.keys()
    for k, v in ref.items():
        assert ev["classification_report"][k] == (pytest.approx(v, abs=1e-12) if isinstance(v, float)
                                                  else {m: pytest.approx(x, abs=1e-12) for m, x in v.items()})
    assert ev["classification_report_text"] == classification_report(y, p, labels=range(7), target_names=names, digits=4,
                                                      zero_division=0)
    assert ev["confusion_matrix"] == confusion_matrix(y, p, labels=range(7)).tolist()  # dense, as before


def test_many_classes_stay_linear_sparse_and_bounded():
    """3,000 classes, one image each: metrics used to hold a 3,000 x 3,000 matrix (27 MB of JSON per split)
    and report.txt 3,000 lines; now nonzero cells only and the worst classes plus a summary."""
    classes = 3000
    y, p = _labels(classes, classes)
    names = [f"class_{i:05d}" for i in range(classes)]
    ev = classification_metrics(y, p, names)
    cm = ev["confusion_matrix"]
    assert cm["classes"] == classes and len(cm["entries"]) <= classes
    assert sum(c for _, _, c in cm["entries"]) == classes
    assert len(json.dumps(ev)) < 1_000_000
    text = ev["classification_report_text"]
    assert len(text.splitlines()) < 40
    assert text.startswith(f"{classes} classes: the 20 with the lowest f1-score are listed")
    assert f"accuracy                         {ev['accuracy']:.4f}      {classes}" in text
    rep = ev["classification_report"]
    assert len(rep) == classes + 3 and rep["macro avg"]["support"] == classes  # every class stays in metrics
    # readers take both forms: the sparse record and an old run's dense matrix agree
    y, p = _labels(150, 400, seed=1)
    sparse = confusion_record(y, p, 150)
    dense = confusion_record(y, p, 150, dense_limit=1000)
    assert isinstance(sparse, dict) and isinstance(dense, list) and len(dense) == 150
    for a, b in zip(confusion_counts(sparse), confusion_counts(dense)):
        np.testing.assert_array_equal(a, b)
    assert balanced_accuracy_ci(sparse) == balanced_accuracy_ci(dense)
    assert sorted(map(tuple, np.stack(confusion_entries(sparse)[:3], 1).tolist())) == \
        sorted(map(tuple, np.stack(confusion_entries(dense)[:3], 1).tolist()))


# --------------------------------------------------------------------------- warnings a reader must see

def _ev(y, p, names):
    return classification_metrics(y, p, names)


def test_warnings_random_weights_tiny_val_one_class():
    names = ["ants", "bees"]
    ev = _ev([0, 0, 1, 1, 1, 1], [1] * 6, names)
    w = run_warnings("none", ev, names)
    assert w[0].startswith("WARNING: random weights (--weights none)") and "scores 0.6667" in w[0]
    assert w[1] == ("WARNING: tiny val split: 6 images (ants 2, bees 4); one image moves the accuracy by 0.167, "
                    "so its figures say little")
    assert w[2] == "WARNING: the kept model predicts one class (bees) for every val image (6 images)"
    big = _ev([0] * 20 + [1] * 20, [0] * 15 + [1] * 25, names)
    assert run_warnings("imagenet", big, names) == []
    assert weights_line("resnet18", "none") == "backbone resnet18, weights none (random init)"


# --------------------------------------------------------------------------- metrics.json's shared part

SHARED_KEYS = {"kind", "best_val_acc", "best_val_acc_ci", "best_epoch", "history", "accuracy", "accuracy_ci",
               "balanced_accuracy", "balanced_accuracy_ci", "classification_report", "confusion_matrix",
               "class_names", "seconds", "recipe", "n", "skipped", "split", "backbone", "weights", "warnings"}


def test_run_metrics_is_the_shared_part_of_every_run():
    names = ["ants", "bees", "wasps"]
    evs = {"val": _ev([0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1, 2, 0], names),
           "test": _ev([0, 1, 2], [0, 1, 1], names)}
    m = run_metrics("finetune", evs, val_split="val", best_val_acc=0.75, best_epoch=3, history=[{"val_acc": 0.75}],
                    class_names=names, seconds=1.5, recipe={"lr": 0.001}, n={"train": 12, "val": 8, "test": 3},
                    skipped=[("a.jpg", "not an image")], split=None, backbone="resnet18", weights="none")
    assert set(m) == SHARED_KEYS
    assert m["kind"] == "finetune" and m["best_epoch"] == 3 and m["skipped"] == [["a.jpg", "not an image"]]
    assert m["best_val_acc_ci"]["correct"] == 6 and m["best_val_acc_ci"]["n"] == 8
    assert m["accuracy"] == {"val": 0.75, "test": pytest.approx(2 / 3)}
    # balanced accuracy = mean recall: val (3/4 + 2/2 + 1/2) / 3, test (1 + 1 + 0) / 3
    assert m["balanced_accuracy"] == {"val": pytest.approx(0.75), "test": pytest.approx(2 / 3)}
    assert m["balanced_accuracy_ci"]["val"]["classes"] == 3
    assert m["warnings"][0].startswith("WARNING: random weights") and "tiny val split: 8 images" in m["warnings"][1]
    json.dumps(m)  # plain JSON


def test_balanced_accuracy_interval_is_wilson_on_the_effective_photo_count():
    from pipeline.metrics import wilson_interval

    even = np.array([[8, 2, 0], [1, 9, 0], [0, 3, 7]])  # 10 photos per class: the interval is accuracy's
    ci = balanced_accuracy_ci(even)
    assert ci["n_eff"] == pytest.approx(30) and (ci["low"], ci["high"]) == pytest.approx(wilson_interval(24, 30))
    one = balanced_accuracy_ci(np.array([[1]]))  # one photo, right: as wide as accuracy's 1/1
    assert (one["low"], one["high"]) == pytest.approx(wilson_interval(1, 1))
    skew = balanced_accuracy_ci(np.array([[90, 5], [1, 4]]))  # 95 + 5 photos: 2^2 / (1/95 + 1/5) = 19
    assert skew["n_eff"] == pytest.approx(19.0) and skew["value"] == pytest.approx((90 / 95 + 4 / 5) / 2)
    assert (skew["low"], skew["high"]) == pytest.approx(wilson_interval(skew["value"] * 19, 19))
    assert skew["low"] < skew["value"] < skew["high"]
