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
        assert torch.equal(run.weight, alone.last_weight)  # bit for bit, not just close
        assert torch.equal(run.bias, alone.last_bias)
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
            assert a.params == p and torch.equal(a.weight, b.weight) and a.history == b.history


def test_out_of_fold_proba_uses_the_head_that_never_saw_the_row():
    X, y = toy(n=30)
    folds = stratified_folds(y, 3, seed=0)
    (runs,), _ = train_folds(X, y, 3, [HeadParams(epochs=3)], folds)
    proba = out_of_fold_proba(X, folds, runs)
    assert proba.shape == (30, 3) and np.allclose(proba.sum(1), 1)
    i = int(np.flatnonzero(folds == 2)[0])
    z = (torch.tensor(X[i]) @ runs[2].weight.T + runs[2].bias).double()
    assert np.allclose(proba[i], torch.softmax(z, 0).numpy())
