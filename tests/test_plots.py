from PIL import Image

from pipeline.plots import confusion_png, curves_png, pick_examples, predictions_png
from tests.conftest import write_image


def test_pick_examples_shows_wrong_ones_and_every_class():
    y_true = [0] * 5 + [1] * 5
    y_pred = [0, 1, 0, 0, 0, 1, 1, 0, 1, 1]  # wrong: 1 and 7
    picked = pick_examples(y_true, y_pred, n=4)
    assert picked == [0, 1, 7, 9]
    assert pick_examples([0, 1], [0, 1], n=8) == [0, 1] and pick_examples([], []) == []


def test_pictures_are_written(tmp_path):
    hist = [{"epoch": e, "train_loss": 1 / (e + 1), "val_loss": 1.1 / (e + 1), "train_acc": 0.5 + e / 10,
             "val_acc": 0.4 + e / 10} for e in range(3)]
    curves_png(hist, tmp_path / "curves.png")
    confusion_png([[3, 1], [0, 4]], ["ants", "bees"], tmp_path / "confusion.png")
    imgs = [write_image(tmp_path / f"i{i}.jpg", i % 2, i) for i in range(4)]
    predictions_png(imgs + [tmp_path / "gone.jpg"], [0, 1, 0, 1, 1], [0, 1, 1, 1, 0], ["ants", "bees"],
                    tmp_path / "predictions.png")
    for name in ("curves.png", "confusion.png", "predictions.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert not list(tmp_path.glob(".*tmp*"))


def test_confusion_view_reads_sparse_records_like_dense():
    """Many classes: metrics.json's sparse record draws the same 25-class picture as the full matrix."""
    import numpy as np

    from pipeline.evaluate import confusion_record
    from pipeline.plots import matrix_view

    g = np.random.default_rng(0)
    y = g.integers(0, 120, 500)
    p = np.where(g.random(500) < 0.5, y, g.integers(0, 120, 500))
    names = [f"c{i}" for i in range(120)]
    sparse, dense = confusion_record(y, p, 120), confusion_record(y, p, 120, dense_limit=10_000)
    assert isinstance(sparse, dict)
    (ms, ns, notes), (md, nd, noted) = matrix_view(sparse, names), matrix_view(dense, names)
    assert ms.shape == (25, 25) and ns == nd and notes == noted == "25 of 120 classes: those with the most errors"
    np.testing.assert_array_equal(ms, md)
    m, n, note = matrix_view(confusion_record([0, 1, 1], [0, 1, 0], 2), ["a", "b"])
    assert m.tolist() == [[1, 0], [1, 1]] and note == ""


def test_curves_have_whole_epoch_ticks_and_mark_the_kept_epoch():
    from pipeline.plots import curves_figure

    hist = [{"epoch": e, "train_loss": 1.0 - e / 4, "val_loss": 1.1 - e / 5, "train_acc": 0.5, "val_acc": 0.6 - e / 10}
            for e in range(2)]
    fig = curves_figure(hist, kept_epoch=0)
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # was 0.2, 0.4, ...
        assert "kept: epoch 0" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_suspects_picture_has_a_legend_for_its_colours(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import pipeline.audit_plots as ap

    drawn = []
    monkeypatch.setattr(ap, "_save", lambda fig, path: drawn.append(fig))
    audit = SimpleNamespace(
        label_issues=[{"path": "a/1.jpg", "split": "train", "label": "ants", "suggested": "bees", "score": 0.9}],
        outliers=[{"path": "b/2.jpg", "split": "val", "z": 7.0, "score": 1.5}])
    ap.suspects_png(audit, None, tmp_path / "suspects.png")
    texts = [t.get_text() for leg in drawn[0].legends for t in leg.get_texts()]
    assert any("label error" in t and t.startswith("red") for t in texts)
    assert any("outlier" in t and t.startswith("orange") for t in texts)
