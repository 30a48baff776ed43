"""K-fold cross-validation: the batched fold engine equals training each fold alone, and train-head --folds."""
import json

import numpy as np
import pytest
import torch

from pipeline import PipelineError
from pipeline.head import (HeadParams, expand_grid, out_of_fold_proba, stratified_folds, train_folds,
                           train_heads)


def toy(n=83, d=16, c=3, seed=0):
    g = np.random.default_rng(seed)
    y = g.integers(0, c, n)
    X = (g.normal(0, 1, (c, d))[y] + g.normal(0, 0.8, (n, d))).astype(np.float32)
    return X, y.astype(np.int64)


def test_stratified_folds_balanced_and_seeded():
    _, y = toy()
    f = stratified_folds(y, 5, seed=0)
    for c in range(3):
        counts = np.bincount(f[y == c], minlength=5)
        assert counts.max() - counts.min() <= 1  # each class within one row of its share in every fold
    assert np.bincount(f).max() - np.bincount(f).min() <= 1
    assert np.array_equal(f, stratified_folds(y, 5, seed=0))
    assert not np.array_equal(f, stratified_folds(y, 5, seed=1))
    with pytest.raises(PipelineError, match="at least 2 folds"):
        stratified_folds(y, 1)
    with pytest.raises(PipelineError, match="cannot make 5 folds of 3 images"):
        stratified_folds(y[:3], 5)


@pytest.mark.parametrize("p", [HeadParams(epochs=6), HeadParams(epochs=5, lr=0.01, momentum=0.5, step_size=2,
                                                                  gamma=0.5, batch_size=7, seed=3)])
def test_each_fold_equals_training_it_alone_exactly(p):
    """Folds have 66 and 67 train rows: the shorter heads run padded inside the batched engine."""
    X, y = toy()
    folds = stratified_folds(y, 5, seed=0)
    (runs,), _ = train_folds(X, y, 3, [p], folds)
    for f, run in enumerate(runs):
        tr, ho = folds != f, folds == f
        (alone,), _ = train_heads((X[tr], y[tr]), (X[ho], y[ho]), 3, [p])
        assert run.fold == f
        # the batched engine's products have other shapes (5 heads, padded rows) than one head's: BLAS may take
        # other kernel paths on other CPUs, so equal to float rounding, not bit for bit
        torch.testing.assert_close(run.weight, alone.last_weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(run.bias, alone.last_bias, rtol=1e-5, atol=1e-6)
        assert run.history == [h["val_acc"] for h in alone.history]
        assert run.heldout_acc == alone.history[-1]["val_acc"]


def test_sweep_of_folds_equals_separate_settings():
    X, y = toy(n=40, seed=2)
    folds = stratified_folds(y, 4, seed=0)
    grid = expand_grid({"lr": [0.001, 0.01], "batch_size": [4, 5], "epochs": [3]})
    together, _ = train_folds(X, y, 3, grid, folds)
    for p, runs in zip(grid, together):
        (alone,), _ = train_folds(X, y, 3, [p], folds)
        for a, b in zip(runs, alone):
            assert a.params == p and a.history == b.history
            torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)  # other batch of heads


def test_out_of_fold_proba_uses_the_head_that_never_saw_the_row():
    X, y = toy(n=30)
    folds = stratified_folds(y, 3, seed=0)
    (runs,), _ = train_folds(X, y, 3, [HeadParams(epochs=3)], folds)
    proba = out_of_fold_proba(X, folds, runs)
    assert proba.shape == (30, 3) and np.allclose(proba.sum(1), 1)
    i = int(np.flatnonzero(folds == 2)[0])
    z = (torch.tensor(X[i]) @ runs[2].weight.T + runs[2].bias).double()
    assert np.allclose(proba[i], torch.softmax(z, 0).numpy())


def _cache(tmp_path, n_train=30, n_val=20):
    from tests.synthetic_cache import blobs, write_cache

    X, y = blobs({0: n_train // 2 + n_val // 2, 1: n_train - n_train // 2 + n_val - n_val // 2}, spread=4.0)
    order = np.random.default_rng(1).permutation(len(y))
    X, y = X[order], y[order]
    paths = [f"{'ab'[c]}/img_{i}.jpg" for i, c in enumerate(y)]
    write_cache(tmp_path / "c.h5", {"train": (X[:n_train], y[:n_train], paths[:n_train]),
                                    "val": (X[n_train:], y[n_train:], paths[n_train:])}, ["ants", "bees"])
    return tmp_path / "c.h5", X, y


def test_train_head_folds_reports_cv_equal_to_the_engine(tmp_path):
    """--folds cross-validates on the train split only; the final head is trained on train, its last epoch kept."""
    from click.testing import CliRunner

    from cli import cli

    path, X, y = _cache(tmp_path)
    r = CliRunner().invoke(cli, ["train-head", str(path), "--out", str(tmp_path / "run"), "--folds", "5",
                                 "--epochs", "4", "--no-plots"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "run/metrics.json").read_text())
    Xtr, ytr = X[:30], y[:30]
    (runs,), _ = train_folds(Xtr, ytr, 2, [HeadParams(epochs=4)], stratified_folds(ytr, 5, seed=0))
    accs = [run.heldout_acc for run in runs]
    assert m["cv"]["per_fold"] == pytest.approx(accs)
    assert m["cv"]["mean"] == pytest.approx(np.mean(accs)) and m["cv"]["std"] == pytest.approx(np.std(accs))
    assert (m["cv"]["folds"], m["cv"]["n"], m["cv"]["on"]) == (5, 30, "train")
    assert f"5-fold CV on train (30 images): mean {np.mean(accs):.4f}, std {np.std(accs):.4f}" in r.output
    assert "5-fold CV on train" in (tmp_path / "run/report.txt").read_text()
    # the final model: trained on train alone, the last epoch kept (val picks nothing)
    (alone,), _ = train_heads((Xtr, ytr), (X[30:], y[30:]), 2, [HeadParams(epochs=4)])
    assert m["best_epoch"] == 3 and m["val_unbiased"] is True
    assert m["best_val_acc"] == pytest.approx(alone.history[-1]["val_acc"])


def test_folds_sweep_is_ranked_and_chosen_by_cv(tmp_path):
    from click.testing import CliRunner

    from cli import cli

    path, X, y = _cache(tmp_path)
    r = CliRunner().invoke(cli, ["train-head", str(path), "--out", str(tmp_path / "run"), "--folds", "3",
                                 "--epochs", "2", "--lr", "0.00001,0.01", "--no-plots"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "run/metrics.json").read_text())
    cv = [row["cv_mean"] for row in m["sweep"]]
    assert m["chosen"] == int(np.argmax(cv)) and m["recipe"]["lr"] == m["sweep"][m["chosen"]]["lr"]
    assert m["cv"]["mean"] == pytest.approx(max(cv))
    lines = r.output.splitlines()
    head = next(i for i, line in enumerate(lines) if "cv_mean" in line)
    table = lines[head + 1:head + 3]  # the higher CV first, marked
    assert float(table[0].split()[1]) >= float(table[1].split()[1]) and table[0].endswith("<- best")
    # the sweep table and its winner are in report.txt and `report RUN` too, not only on the screen
    assert "\n".join(table) in (tmp_path / "run/report.txt").read_text()
    assert "\n".join(table) in CliRunner().invoke(cli, ["report", str(tmp_path / "run")]).output


def test_bad_folds_one_line_error(tmp_path):
    from click.testing import CliRunner

    from cli import cli

    path, _, _ = _cache(tmp_path, n_train=4, n_val=2)
    r = CliRunner().invoke(cli, ["train-head", str(path), "--out", str(tmp_path / "run"), "--folds", "1"])
    assert r.exit_code == 1 and "Error: --folds 1 needs 2 <= folds <= the 4 images of train" in r.output
    r = CliRunner().invoke(cli, ["train-head", str(path), "--out", str(tmp_path / "run"), "--folds", "5"])
    assert r.exit_code == 1 and "Error: --folds 5 needs 2 <= folds <= the 4 images of train" in r.output
