"""The sidecar (pipeline/sidecar.py): its report equals the in-process one, a dead sidecar costs only the
pictures, and TLEARN_NO_SIDECAR=1 makes everything in the command's own process."""
import numpy as np
from click.testing import CliRunner

from cli import cli
from pipeline import plots, sidecar
from pipeline.metrics import classification_metrics


def _preds(n=40, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).tolist()
    p = [v if rng.random() < 0.7 else int(rng.integers(0, classes)) for v in y]
    return y, p


def test_sidecar_report_is_exactly_the_in_process_one():
    names = ["ants", "bees", "wasps"]
    splits = {"val": _preds(), "test": _preds(seed=1)}
    with sidecar.sidecar(plots=False) as side:
        assert side is not None
        remote = sidecar.split_classification_metrics(side, splits, names)
    here = {s: classification_metrics(y, p, names) for s, (y, p) in splits.items()}
    assert remote == here
    assert remote["val"]["classification_report_text"] == here["val"]["classification_report_text"]


def test_a_dead_sidecar_costs_nothing_but_the_pictures(tmp_path):
    names = ["a", "b", "c"]
    splits = {"val": _preds()}
    side = sidecar.Sidecar.start(plots=False)
    side.kill()
    assert sidecar.split_classification_metrics(side, splits, names) == {"val": classification_metrics(*splits["val"], names)}
    job = plots.PictureJob(str(tmp_path), [], [[1]], ["a"], "val", [], [], [])
    notes = sidecar.start_pictures(side, job)()
    assert len(notes) == 1 and notes[0].startswith("pictures not drawn:")
    side.close()


def test_no_sidecar_env_makes_train_head_draw_in_its_own_process(small_cache, tmp_path, monkeypatch):
    started = []
    start = sidecar.Sidecar.start.__func__
    monkeypatch.setattr(sidecar.Sidecar, "start", classmethod(lambda cls, *a, **k: started.append(a)
                                                              or start(cls, *a, **k)))
    for env, runs in (("1", 0), ("0", 1)):
        monkeypatch.setenv("TLEARN_NO_SIDECAR", env)
        out = tmp_path / f"run{env}"
        r = CliRunner().invoke(cli, ["train-head", str(small_cache), "--out", str(out), "--epochs", "2"])
        assert r.exit_code == 0, r.output
        assert len(started) == runs and "precision    recall  f1-score   support" in r.output
        for name in ("report.txt", "curves.png", "confusion.png", "predictions.png"):
            assert (out / name).stat().st_size > 0, name
