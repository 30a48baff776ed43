"""95% Wilson score intervals on every reported accuracy."""
import math

import pytest

from cli import sweep_table
from pipeline.evaluate import accuracy_ci, evaluate_predictions, format_accuracy, report_text, split_metrics, \
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
    ev = evaluate_predictions([0] * 10 + [1] * 10, [0] * 10 + [1] * 7 + [0] * 3, ["a", "b"])
    assert ev["accuracy"] == 0.85 and ev["accuracy_ci"]["correct"] == 17 and ev["accuracy_ci"]["n"] == 20
    lo, hi = wilson_interval(17, 20)
    assert (ev["accuracy_ci"]["low"], ev["accuracy_ci"]["high"]) == (lo, hi)
    m = split_metrics({"val": ev})
    assert m["accuracy_ci"] == {"val": ev["accuracy_ci"]}
    text = report_text({"val": ev}, 0.85, 4)
    assert text.startswith(f"best val acc 0.8500 (95% CI {lo:.3f}-{hi:.3f}, 17/20) at epoch 4\n")
    assert f"== val: 20 images, accuracy 0.8500 (95% CI {lo:.3f}-{hi:.3f}, 17/20) ==" in text


def test_sweep_table_shows_the_interval():
    rows = [{"lr": 0.001, "best_val_acc": 146 / 153, "best_epoch": 3, "best_val_ci": accuracy_ci(146, 153)},
            {"lr": 0.01, "best_val_acc": 140 / 153, "best_epoch": 9, "best_val_ci": accuracy_ci(140, 153)}]
    lines = sweep_table(rows).splitlines()
    assert lines[0].split() == ["lr", "best_val_acc", "95%", "CI", "correct", "best_epoch"]
    assert lines[1].split() == ["0.001", "0.9542", "0.909-0.978", "146/153", "3", "<-", "best"]
    assert lines[2].split()[:4] == ["0.01", "0.9150", "0.860-0.950", "140/153"]
