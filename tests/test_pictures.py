"""The pictures a person reads: numbers legible on their cells, nothing drawn outside the figure, titles
that tell photos apart, words that match the run (no "-0.0", no "calibrated" without a temperature)."""
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from cli import cli
from pipeline import audit_plots as ap
from pipeline import plots
from tests.conftest import write_image

LONG = "Great Spotted Woodpecker (juvenile plumage)"


def class_names(k: int) -> list[str]:
    return [f"{LONG} {i}" if i % 3 == 0 else f"c{i}" for i in range(k)]


def texts_outside(fig) -> list[str]:
    """What is drawn outside the figure: the bounding box of everything drawn (titles, tick labels,
    annotations, legends) against the figure's own, as a list of the sides it crosses."""
    fig.canvas.draw()
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    w, h = fig.get_size_inches()
    eps = 0.02
    sides = {"left": box.x0 < -eps, "bottom": box.y0 < -eps, "right": box.x1 > w + eps, "top": box.y1 > h + eps}
    return [side for side, out in sides.items() if out]


@pytest.mark.parametrize("matrix", [[[45, 25], [38, 45]], [[0, 1], [2, 300]],
                                    np.random.default_rng(0).integers(0, 40, (10, 10)).tolist()])
def test_every_count_contrasts_with_its_own_cell(matrix):
    """The 25 of [[45, 25], [38, 45]] was white on white (colours from the smallest cell, white above max/2)."""
    names = class_names(len(matrix))
    fig = plots.confusion_figure(matrix, names)
    ax = fig.axes[0]
    image = ax.images[0]
    counts = [t for t in ax.texts]
    assert len(counts) == np.size(matrix)
    for t in counts:
        j, i = (int(round(v)) for v in t.get_position())
        cell = image.to_rgba(np.asarray(matrix)[i, j])
        from matplotlib.colors import to_rgb

        assert plots.contrast_ratio(cell, to_rgb(t.get_color())) >= 4.5, (t.get_text(), cell, t.get_color())
    assert texts_outside(fig) == []  # long class names: elided, and the margins hold them
    assert all(len(t.get_text()) <= 24 for t in ax.get_yticklabels())


def test_short_labels_keep_both_ends():
    assert plots.short_label("Great Spotted Woodpecker (juvenile plumage) 3") == "Great Spotte\u2026 plumage) 3"
    assert plots.short_label("ants") == "ants"
    assert plots.short_path("train/ants/IMG_1002.JPG", 34) == "ants/IMG_1002.JPG"
    assert plots.short_path("train/bees/IMG_1002.JPG", 34) == "bees/IMG_1002.JPG"
    long = plots.short_path(f"train/{LONG}/Screenshot 2024-05-02 at 10.41.23.png", 34)
    assert len(long) <= 34 and long.startswith("Great") and long.endswith(".png")


def calibration(fitted: bool) -> dict:
    bins = [{"low": i / 15, "high": (i + 1) / 15, "n": n, "confidence": (i + 0.5) / 15, "accuracy": a}
            for i, (n, a) in enumerate([(0, None)] * 7 + [(1, 0.0), (3, 0.33), (1, 1.0), (1, 1.0), (4, 0.25),
                                                           (3, 0.33), (6, 0.83), (134, 0.99)])]
    cov = [{"min_confidence": p, "kept": k, "n_kept": int(153 * k), "accuracy": a}
           for p, k, a in [(0.5, 1.0, 0.9346), (0.8, 0.93, 0.972), (0.9, 0.92, 0.986), (0.95, 0.83, 1.0),
                           (0.99, 0.74, 1.0)]]
    return {"temperature": 0.7 if fitted else 1.0, "fitted": fitted, "reliability": {"val": bins},
            "reliability_before": {"val": bins}, "coverage": {"val": cov},
            "ece": {"val": {"before": 0.045, "after": 0.040 if fitted else 0.045}}}


@pytest.mark.parametrize("fitted", [True, False])
def test_coverage_labels_stay_inside_and_the_title_says_whether_calibrated(fitted):
    fig = plots.coverage_figure(calibration(fitted))
    ax = fig.axes[0]
    fig.canvas.draw()
    box = ax.get_window_extent()
    for t in ax.texts:  # "P 0.5" was cut at the right edge
        e = t.get_window_extent()
        assert box.x0 <= e.x0 and e.x1 <= box.x1 and box.y0 <= e.y0 and e.y1 <= box.y1, t.get_text()
    title = ax.get_title()
    assert ("(calibrated)" in title) == fitted and ("no temperature kept" in title) == (not fitted)
    assert texts_outside(fig) == []


@pytest.mark.parametrize("fitted", [True, False])
def test_reliability_counts_sit_in_their_own_panel(fitted):
    fig = plots.reliability_figure(calibration(fitted))
    curve_ax, bars_ax = fig.axes
    assert len(curve_ax.texts) == 0  # no counts on the markers or the axis
    assert sorted(int(t.get_text()) for t in bars_ax.texts) == sorted([1, 3, 1, 1, 4, 3, 6, 134])
    labels = [t.get_text() for t in curve_ax.get_legend().get_texts()]
    assert any("calibrated" in s for s in labels) == fitted
    assert ("no temperature kept" in curve_ax.get_title()) == (not fitted)
    assert texts_outside(fig) == []


def learning_record(rows: list[int], gain: float) -> dict:
    pts = [{"share": s, "rows": r, "per_class": r / 2, "values": [0.5], "mean": 0.5, "low": 0.1, "high": 0.9}
           for s, r in zip((0.25, 0.5, 1.0), rows)]
    return {"metric": "accuracy", "points": pts, "n_val": 40,
            "doubling": {"gain": gain, "se": 0.0, "from_share": 0.5, "to_share": 1.0}}


def test_learning_curve_title_never_reads_minus_zero():
    small = plots.learning_curve_figure(learning_record([4, 4, 4], -1e-12)).axes[0].get_title()
    assert small == "train is too small for a curve: every share holds the same 4 rows"
    flat = plots.learning_curve_figure(learning_record([10, 20, 40], -1e-12)).axes[0].get_title()
    assert "+0.0 points" in flat and "-0.0" not in flat
    assert plots.signed(-0.04) == "+0.0" and plots.signed(-0.06) == "-0.1" and plots.signed(0.31) == "+0.3"


def test_prediction_titles_carry_the_probability_and_fit_their_tile(tmp_path):
    assert plots.prediction_title("bees", "bees", 0.9731) == "predicted: bees (p 0.97)"
    wrong = plots.prediction_title(f"{LONG} 1", f"{LONG} 2", 0.51)
    assert wrong.splitlines()[1].startswith("WRONG (true: ") and max(len(s) for s in wrong.splitlines()) <= 38
    imgs = [write_image(tmp_path / f"{i}.jpg", i % 2, i) for i in range(8)]
    drawn = []
    real_save = plots._save
    plots._save = lambda fig, path: drawn.append(fig)
    try:
        plots.predictions_png(imgs, [0, 1] * 4, [1, 1] * 4, [f"{LONG} a", f"{LONG} b"], tmp_path / "p.png",
                              confidence=[0.6] * 8)
    finally:
        plots._save = real_save
    fig = drawn[0]
    assert texts_outside(fig) == []
    assert all("(p 0.60)" in t.get_text() for t in fig.texts)
    boxes = [t.get_window_extent() for t in fig.texts]  # neighbours' titles stay apart
    assert not any(boxes[a].overlaps(boxes[b]) for a in range(len(boxes)) for b in range(a + 1, len(boxes)))


def test_a_head_run_draws_its_predictions_with_their_probabilities(small_cache, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(plots, "predictions_png", lambda *a, **k: seen.update(k))
    r = CliRunner().invoke(cli, ["train-head", str(small_cache), "--out", str(tmp_path / "run"), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    conf = seen["confidence"]
    assert conf and all(0.0 < p <= 1.0 for p in conf)


def suspects_audit(names: list[str]) -> SimpleNamespace:
    rels = [f"train/{names[i % len(names)]}/IMG_1002.JPG" if i < 2 else
            f"train/{names[i % len(names)]}/Screenshot 2024-05-02 at 10.41.23 copy {i}.png" for i in range(12)]
    issues = [{"path": r, "split": "train", "label": names[i % len(names)], "suggested": names[(i + 1) % len(names)],
               "score": 0.9} for i, r in enumerate(rels[:8])]
    outliers = [{"path": r, "split": "val", "z": 5.0, "score": 1.2} for r in rels[8:]]
    return SimpleNamespace(label_issues=issues, outliers=outliers)


@pytest.mark.parametrize("k", [2, 100])
def test_suspect_titles_tell_photos_apart_and_do_not_overlap(tmp_path, monkeypatch, k):
    drawn = []
    monkeypatch.setattr(ap, "_save", lambda fig, path: drawn.append(fig))
    names = class_names(k) if k > 2 else ["ants", "bees"]
    ap.suspects_png(suspects_audit(names), None, tmp_path / "s.png")
    fig = drawn[0]
    fig.canvas.draw()
    titles = [ax.title for ax in fig.axes if ax.get_title()]
    firsts = [t.get_text().splitlines()[0] for t in titles]
    assert firsts[0] != firsts[1] and firsts[0].endswith("/IMG_1002.JPG")  # same name, two classes: two photos
    assert all(len(line) <= ap.TITLE_CHARS for t in titles for line in t.get_text().splitlines())
    boxes = [t.get_window_extent() for t in titles]
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            assert not boxes[a].overlaps(boxes[b]), (titles[a].get_text(), titles[b].get_text())
    # no empty band: the legend sits right above the first row's titles
    legend = fig.legends[0].get_window_extent()
    top_title = max(e.y1 for e in boxes)
    assert 0 <= legend.y0 - top_title < 0.35 * fig.dpi
