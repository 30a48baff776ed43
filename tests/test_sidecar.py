"""The sidecar (pipeline/sidecar.py): its report equals the in-process one, and a dead sidecar costs
only the pictures."""
import numpy as np

from pipeline import plots, sidecar
from pipeline.evaluate import evaluate_predictions


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
        remote = sidecar.evaluate_splits(side, splits, names)
    here = {s: evaluate_predictions(y, p, names) for s, (y, p) in splits.items()}
    assert remote == here
    assert remote["val"]["report_text"] == here["val"]["report_text"]


def test_a_dead_sidecar_costs_nothing_but_the_pictures(tmp_path):
    names = ["a", "b", "c"]
    splits = {"val": _preds()}
    side = sidecar.Sidecar.start(plots=False)
    side.kill()
    assert sidecar.evaluate_splits(side, splits, names) == {"val": evaluate_predictions(*splits["val"], names)}
    job = plots.PictureJob(str(tmp_path), [], [[1]], ["a"], "val", [], [], [])
    notes = sidecar.start_pictures(side, job)()
    assert len(notes) == 1 and notes[0].startswith("pictures not drawn:")
    side.close()

