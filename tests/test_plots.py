from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from cli import cli
from pipeline import plots
from pipeline.plots import confusion_png, curves_png, pick_examples, predictions_png
from tests.conftest import make_dataset, write_image


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

    from pipeline.metrics import confusion_record
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


def test_many_classes_give_a_bounded_confusion_picture(tmp_path):
    """300 classes: the confusion picture stays at most 1600 px, shows the 25 classes with the most errors,
    and says so."""
    classes = [f"class_{i:03d}" for i in range(300)]
    y = list(range(300)) * 2
    p = list(y)
    for k in range(0, 60, 2):  # 30 errors: class k predicted as k + 1
        p[k] = k + 1
    m = np.zeros((300, 300), np.int64)
    np.add.at(m, (y, p), 1)
    sub, names, note = plots.matrix_view(m.tolist(), classes)
    assert sub.shape == (25, 25) and note == "25 of 300 classes: those with the most errors"
    assert names == sorted(names) and "class_000" in names and "class_299" not in names
    assert sub.sum() >= 25  # the errors among the shown classes are kept
    job = plots.PictureJob(str(tmp_path), [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.0, "train_acc": 0.5,
                                            "val_acc": 0.5}], m.tolist(), classes, "val",
                           [str(tmp_path / "gone.jpg")] * 600, y, p)
    assert plots.draw_pictures(job) == []
    with Image.open(tmp_path / "confusion.png") as im:
        assert max(im.size) <= 1600
    assert plots.matrix_view([[1, 2], [3, 4]], ["a", "b"])[2] == ""


def test_a_failing_picture_never_fails_a_finished_run(small_cache, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(plots, "confusion_png", boom)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train-head", str(small_cache), "--out", str(out), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert "confusion.png not drawn: MemoryError: std::bad_alloc" in r.output
    assert (out / "model.pt").is_file() and (out / "curves.png").is_file() and (out / "predictions.png").is_file()
    assert not (out / "confusion.png").exists()


def test_data_folder_of_a_relative_cache_resolves_from_anywhere(tmp_path, monkeypatch):
    """A cache that recorded DATA_DIR as typed ('data') still finds its images when train-head runs
    elsewhere: next to the cache file, or under the current folder."""
    work = tmp_path / "work"
    img = write_image(work / "data" / "val" / "ants" / "a.jpg", 0, 0)
    monkeypatch.chdir(tmp_path)
    assert plots.resolve_data_dir("data", work / "feats.h5", "val/ants/a.jpg") == work / "data"
    monkeypatch.chdir(work)
    assert plots.resolve_data_dir("data", tmp_path / "elsewhere" / "feats.h5", "val/ants/a.jpg") == work / "data"
    assert plots.resolve_data_dir(str(work / "data"), "x.h5") == work / "data"
    assert isinstance(plots.thumbnail(img), np.ndarray)
    assert plots.thumbnail(work / "nope.jpg") == plots.MISSING
    (work / "bad.jpg").write_bytes(b"not an image")
    assert plots.thumbnail(work / "bad.jpg").startswith("cannot read image")
    assert plots.inside(work, "../etc/passwd") is None and plots.inside(work, "/etc/passwd") is None
    assert plots.inside(work, "val/ants/a.jpg") == work / "val/ants/a.jpg"


def test_train_head_from_another_folder_finds_the_images(tmp_path, monkeypatch):
    from cache import read_cache
    from pipeline.train_head import picture_paths

    make_dataset(tmp_path / "data", {"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}})
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["extract", "data", "--cache", "feats.h5", "--weights", "none", "--workers", "0"])
    assert r.exit_code == 0, r.output
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    paths = picture_paths(read_cache(tmp_path / "feats.h5"), "val")
    assert len(paths) == 2 and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)



def test_data_folder_prefers_the_recorded_absolute_root(tmp_path, monkeypatch):
    """train-head's pictures and audit find a cache's images the same way: --data-dir, the absolute
    data_root, then the data_dir extract was given (relative: beside the cache or under the cwd)."""
    from cache import read_cache
    from tests.synthetic_cache import write_cache

    photos = tmp_path / "photos"
    write_image(photos / "val" / "a" / "0.jpg", 0, 0)
    X = np.zeros((1, 4), np.float32)
    y = np.zeros(1, np.int64)
    splits = {"train": (X, y, ["val/a/0.jpg"]), "val": (X, y, ["val/a/0.jpg"])}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    c = read_cache(write_cache(tmp_path / "caches" / "c.h5", splits, ["a"], data_root=str(photos),
                               config={"data_dir": "photos"}))
    assert plots.data_folder(c) == (photos, "")  # "photos" is not under the cwd nor beside the cache
    assert plots.data_folder(c, str(elsewhere)) == (elsewhere, "")
    assert plots.data_folder(c, str(tmp_path / "nope"))[1].endswith("is not a folder")
    old = read_cache(write_cache(tmp_path / "old.h5", splits, ["a"], data_root="", config={"data_dir": "photos"}))
    assert plots.data_folder(old) == (photos, "")  # relative, found beside the cache file by its first path
    lost = read_cache(write_cache(tmp_path / "lost.h5", splits, ["a"], data_root="", config={"data_dir": "gone"}))
    folder, why = plots.data_folder(lost)
    assert folder is None and why.startswith("data folder not found (tried ")
    # the recorded root was moved; a folder of the same name under the cwd holds other photos: no guess
    monkeypatch.chdir(tmp_path)
    moved = read_cache(write_cache(tmp_path / "caches" / "m.h5", splits, ["a"], data_root=str(tmp_path / "gone"),
                                   config={"data_dir": "photos"}))
    assert plots.data_folder(moved) == (None, f"data folder {tmp_path / 'gone'} not found (moved or deleted?)")
    crafted = read_cache(write_cache(tmp_path / "evil.h5", splits, ["a"], data_root="../../etc",
                                     config={"data_dir": "photos"}))
    assert plots.data_folder(crafted)[0] is None and "not an absolute path" in plots.data_folder(crafted)[1]


def test_import_in_background_loads_the_drawing_modules_on_a_daemon_thread():
    import subprocess
    import sys

    code = ("import sys, threading\nfrom pipeline.plots import import_in_background\nimport_in_background()\n"
            "t = next(t for t in threading.enumerate() if t.name == 'tlearn-import-matplotlib')\n"
            "assert t.daemon\nt.join(60)\n"
            "print(all(m in sys.modules for m in ('matplotlib.figure', 'matplotlib.backends.backend_agg')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr
