"""Calibrated probabilities: ECE and reliability by hand, the temperature fit, train-head's calibration record
and pictures, and predict/export with and without a temperature in model.pt."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import cli
from pipeline.calibration import coverage, ece, fit_temperature, nll, reliability, softmax
from tests.synthetic_cache import blobs, write_cache


def test_ece_and_reliability_match_a_hand_computation():
    conf = np.array([0.95, 0.97, 0.91, 0.62, 0.65, 0.5, 1 / 15, 0.40])
    ok = np.array([1, 1, 0, 1, 0, 0, 1, 1], dtype=bool)
    # 15 bins of width 1/15, (low, high]: 0.95, 0.97 -> bin 14; 0.91 -> 13; 0.62, 0.65 -> 9; 0.5 -> 7;
    # 1/15 -> 0 (its upper edge); 0.40 -> 5 (0.4 = 6/15 is the upper edge of bin 5)
    bins = {14: ([0.95, 0.97], [1, 1]), 13: ([0.91], [0]), 9: ([0.62, 0.65], [1, 0]), 7: ([0.5], [0]),
            0: ([1 / 15], [1]), 5: ([0.40], [1])}
    hand = sum(len(c) / 8 * abs(np.mean(a) - np.mean(c)) for c, a in bins.values())
    assert ece(conf, ok) == pytest.approx(hand, abs=1e-12)
    rows = reliability(conf, ok)
    assert len(rows) == 15 and [r["n"] for r in rows] == [len(bins.get(b, ([], []))[0]) for b in range(15)]
    assert rows[9]["confidence"] == pytest.approx(0.635) and rows[9]["accuracy"] == 0.5
    assert "accuracy" not in rows[1] and rows[14]["low"] == pytest.approx(14 / 15) and rows[14]["high"] == 1.0
    cov = {r["min_confidence"]: r for r in coverage(conf, ok, (0.0, 0.9, 0.99))}
    assert cov[0.0]["kept"] == 1.0 and cov[0.0]["accuracy"] == pytest.approx(5 / 8)
    assert cov[0.9]["n_kept"] == 3 and cov[0.9]["accuracy"] == pytest.approx(2 / 3)
    assert cov[0.99]["n_kept"] == 0 and cov[0.99]["accuracy"] is None


def _overconfident(n=2000, classes=4, scale=6.0, seed=0):
    """Labels drawn from softmax(z); the head reports scale * z: far too sure of itself."""
    g = np.random.default_rng(seed)
    z = g.normal(0, 1.5, (n, classes))
    p = softmax(z)
    y = np.array([g.choice(classes, p=row) for row in p])
    return z * scale, y


def test_temperature_undoes_an_overconfident_head():
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert 4.5 < t < 7.5  # the true temperature is 6
    assert nll(logits, y, t) < 0.7 * nll(logits, y)
    grid = np.exp(np.linspace(np.log(0.1), np.log(20), 400))
    best = grid[np.argmin([nll(logits, y, g) for g in grid])]
    assert t == pytest.approx(best, rel=0.03)  # the minimum of the NLL, as a grid search finds it
    conf = lambda tt: softmax(logits, tt).max(1)  # noqa: E731
    ok = softmax(logits).argmax(1) == y
    assert ece(conf(t), ok) < 0.03 < 0.2 < ece(conf(1.0), ok)
    xt, yt = _overconfident(seed=1)  # held out: the fitted T helps there too
    okt = softmax(xt).argmax(1) == yt
    assert ece(softmax(xt, t).max(1), okt) < min(0.06, ece(softmax(xt).max(1), okt) / 3)


def _cache(path, seed=0, perm_val=False):
    X, y = blobs({0: 90, 1: 90, 2: 90}, dim=16, seed=seed, spread=5.0)
    order = np.random.default_rng(1).permutation(len(y))
    X, y = X[order], y[order]
    tr, va = slice(0, 150), slice(150, 210)
    yva = np.random.default_rng(2).permutation(y[va]) if perm_val else y[va]
    paths = [f"c{c}/img_{i}.jpg" for i, c in enumerate(y)]
    return write_cache(path, {"train": (X[tr], y[tr], paths[tr]), "val": (X[va], yva, paths[va]),
                              "test": (X[210:], y[210:], paths[210:])}, ["a", "b", "c"])


def test_train_head_fits_the_temperature_on_train_only_and_reports_ece(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train-head", str(_cache(tmp_path / "c.h5")), "--out", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    cal = m["calibration"]
    assert cal["fitted"] and "out-of-fold predictions of 5-fold cross-validation on train (150 rows)" in cal["fit_on"]
    assert set(cal["ece"]) == {"val", "test"} and cal["bins"] == 15
    for s, n in (("val", 60), ("test", 60)):
        assert sum(b["n"] for b in cal["reliability"][s]) == n and len(cal["reliability"][s]) == 15
        assert cal["accuracy"][s] == pytest.approx(m["accuracy"][s])  # the run's own accuracy: T changes no class
        assert cal["coverage"][s][0] == {"min_confidence": 0.0, "kept": 1.0, "n_kept": n,
                                         "accuracy": pytest.approx(m["accuracy"][s])}
    manifest = torch.load(out / "model.pt", weights_only=True)
    assert manifest["temperature"] == pytest.approx(cal["temperature"]) and manifest["temperature"] != 1.0
    report = (out / "report.txt").read_text()
    assert f"temperature {cal['temperature']:.3f} fitted on out-of-fold" in report
    assert f"val {cal['ece']['val']['before']:.4f} -> {cal['ece']['val']['after']:.4f}" in report
    assert (out / "reliability.png").stat().st_size > 0 and (out / "coverage.png").stat().st_size > 0
    # val takes no part: its labels permuted, the same temperature
    out2 = tmp_path / "run2"
    r = CliRunner().invoke(cli, ["train-head", str(_cache(tmp_path / "p.h5", perm_val=True)), "--out", str(out2),
                                 "--no-plots"])
    assert r.exit_code == 0, r.output
    assert json.loads((out2 / "metrics.json").read_text())["calibration"]["temperature"] == cal["temperature"]


def test_tutorial_recipe_is_not_calibrated_and_says_why(tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train-head", str(_cache(tmp_path / "c.h5")), "--out", str(out), "--recipe",
                                 "tutorial", "--epochs", "2", "--no-plots"])
    assert r.exit_code == 0, r.output
    cal = json.loads((out / "metrics.json").read_text())["calibration"]
    assert not cal["fitted"] and cal["temperature"] == 1.0 and "no out-of-fold predictions" in cal["not_fitted"]
    assert cal["ece"]["val"]["before"] == cal["ece"]["val"]["after"]
    assert torch.load(out / "model.pt", weights_only=True)["temperature"] is None
    assert "calibration: none (the tutorial's recipe" in (out / "report.txt").read_text()


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    from tests.conftest import head_run_folder

    return head_run_folder(tmp_path_factory.mktemp("cal"), {"train": {"ants": 5, "bees": 5},
                                                            "val": {"ants": 2, "bees": 2}})


def test_predict_and_export_use_the_temperature_and_old_runs_predict_as_before(image_run, tmp_path):
    import shutil

    from cache import read_cache
    from pipeline.predict import export_program, predict
    from pipeline.runfolder import load_manifest, save_manifest

    data, out = image_run
    c = read_cache(out / "features.h5")
    m = load_manifest(out)
    files = [str(data / p) for p in c.splits["val"].paths]
    z = torch.tensor(c.splits["val"].features) @ m.state_dict["weight"].T + m.state_dict["bias"]

    def probs(run):
        return torch.tensor([[p.probabilities["ants"], p.probabilities["bees"]] for p in predict(str(run), files,
                                                                                                   device="cpu")])
    for t in (None, 3.0):
        run = tmp_path / f"run_{t}"
        shutil.copytree(out, run)
        m.temperature = t
        payload = m.to_payload()
        if t is None:  # a model.pt written before the field existed
            del payload["temperature"]
        torch.save(payload, run / "model.pt")
        torch.testing.assert_close(probs(run), torch.softmax(z / (t or 1.0), 1), atol=1e-5, rtol=1e-4)
    prog = export_program(str(tmp_path / "run_3.0"), tmp_path / "p.pt2")
    assert prog["class_names"] == ["ants", "bees"]
    m.temperature = 0.0
    save_manifest(tmp_path / "run_3.0" / "model.pt", m)
    r = CliRunner().invoke(cli, ["predict", str(tmp_path / "run_3.0"), files[0]])
    assert r.exit_code == 1 and "temperature is not a positive number" in r.output


def test_ece_floor_is_the_ece_of_a_perfectly_calibrated_model():
    from pipeline.calibration import ece, ece_floor

    rng = np.random.default_rng(3)
    conf = rng.uniform(0.5, 1.0, 300)
    floor = ece_floor(conf)
    # independent check: the reliability-table ECE of predictions drawn right with probability = confidence
    direct = [ece(conf, rng.random(len(conf)) < conf) for _ in range(400)]
    assert floor["median"] == pytest.approx(np.median(direct), rel=0.1)
    assert floor["p95"] == pytest.approx(np.percentile(direct, 95), rel=0.15)
    assert ece_floor(conf) == floor  # seeded
    big = ece_floor(rng.uniform(0.5, 1.0, 3000))
    assert big["median"] < floor["median"] / 2  # about 1/sqrt(n)
    assert ece_floor(np.ones(50))["p95"] == 0.0  # certain and always right: no noise
    assert ece_floor(np.array([]))["draws"] == 0


def test_report_gives_the_noise_floor_beside_the_ece():
    from pipeline.calibration import calibrate

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 3)) * 3
    labels = rng.integers(0, 3, 200)
    cal = calibrate(logits, labels, "oof", {"val": (logits[:120], labels[:120])})
    assert set(cal.record["ece_floor"]) == {"val"}
    line = next(x for x in cal.lines if x.startswith("ECE of a perfectly calibrated model"))
    assert f"val {cal.record['ece_floor']['val']['median']:.4f}" in line


def test_a_fit_that_runs_to_the_end_of_its_range_is_not_kept():
    from pipeline.calibration import calibrate

    logits = np.array([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]])
    labels = np.array([0, 1, 0])  # every out-of-fold prediction right: the fit sharpens without end
    cal = calibrate(logits, labels, "oof", {"val": (logits, labels)})
    assert cal.temperature is None and cal.record["temperature"] == 1.0
    assert "end of its range" in cal.record["not_fitted"]
