"""train-head's default: the recipe chosen by cross-validation on train only; --recipe tutorial; class weights;
balanced accuracy."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cli import cli
from pipeline.head import class_weights, init_linear, stratified_folds, train_heads, train_probes
from pipeline.recipe import HeadParams, ProbeParams, auto_grid
from pipeline.metrics import balanced_accuracy_ci
from tests.synthetic_cache import blobs, write_cache


def _cache(tmp_path, counts=None, name="c.h5", val_perm=None, spread=6.0):
    """Three overlapping classes; train 60, val 30 rows (val labels permuted by val_perm)."""
    counts = counts or {0: 30, 1: 30, 2: 30}
    X, y = blobs(counts, dim=16, spread=spread)
    order = np.random.default_rng(1).permutation(len(y))
    X, y = X[order], y[order]
    n_tr = len(y) * 2 // 3
    yva = y[n_tr:] if val_perm is None else y[n_tr:][val_perm]
    paths = [f"c{c}/img_{i}.jpg" for i, c in enumerate(y)]
    write_cache(tmp_path / name, {"train": (X[:n_tr], y[:n_tr], paths[:n_tr]),
                                  "val": (X[n_tr:], yva, paths[n_tr:])}, ["a", "b", "c"])
    return tmp_path / name, X, y, n_tr


def _train(cache, out, *args):
    r = CliRunner().invoke(cli, ["train-head", str(cache), "--out", str(out), "--no-plots", *args])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    sd = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    return r, m, sd


def test_default_chooses_on_train_only_val_labels_change_no_choice(tmp_path):
    """Permuting val's labels changes no choice: the same CV table, chosen recipe and weights."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _, _, n_tr = _cache(tmp_path / "a")
    b, _, _, _ = _cache(tmp_path / "b", val_perm=np.random.default_rng(5).permutation(30))
    ra, ma, sa = _train(a, tmp_path / "ra")
    rb, mb, sb = _train(b, tmp_path / "rb")
    assert ma["recipe_mode"] == "auto" and ma["val_unbiased"] is True and ma["kept_epoch"] == "last"
    sel = ma["selection"]
    assert sel["on"] == "train" and sel["n"] == n_tr and sel["folds"] == 5
    assert sel["candidates"] == mb["selection"]["candidates"] and sel["chosen"] == mb["selection"]["chosen"]
    assert ma["recipe"] == mb["recipe"]
    assert torch.equal(sa["weight"], sb["weight"]) and torch.equal(sa["bias"], sb["bias"])
    assert ma["accuracy"]["val"] != mb["accuracy"]["val"]  # the permutation did change what val says
    # the grid holds the tutorial's recipe (first: it wins ties) and the probes; the winner is the best CV mean
    names = [c["recipe"] for c in sel["candidates"]]
    assert names[0].startswith("tutorial SGD lr 0.001, 25 epochs, batch 4") and len(names) == len(auto_grid(48))
    means = [c["cv_mean"] for c in sel["candidates"]]
    assert sel["chosen"] == int(np.argmax(means))
    report = (tmp_path / "ra" / "report.txt").read_text()
    assert "5-fold cross-validation on train (60 images" in report and "val took no part in any choice" in report
    assert "<- chosen" in report and "(unbiased: no choice saw val)" in report
    assert report in CliRunner().invoke(cli, ["report", str(tmp_path / "ra")]).output + "\n"


def test_recipe_tutorial_is_todays_result(tmp_path):
    cache, X, y, n = _cache(tmp_path)
    r, m, sd = _train(cache, tmp_path / "run", "--recipe", "tutorial")
    (ref,), _ = train_heads((X[:n], y[:n]), (X[n:], y[n:]), 3, [HeadParams()])
    assert m["recipe_mode"] == "tutorial" and m["val_unbiased"] is False
    assert (m["best_epoch"], m["best_val_acc"]) == (ref.best_epoch, ref.best_val_acc)
    assert len(m["history"]) == 25 and m["history"] == ref.history
    assert torch.equal(sd["weight"], ref.weight) and torch.equal(sd["bias"], ref.bias)
    assert "the val figure is optimistic (val picked the epoch)" in r.output
    # explicit recipe flags win over the automatic choice: they select the tutorial's family
    _, m2, _ = _train(cache, tmp_path / "run2", "--epochs", "3")
    assert m2["recipe_mode"] == "tutorial" and len(m2["history"]) == 3 and "selection" not in m2
    r3 = CliRunner().invoke(cli, ["train-head", str(cache), "--out", str(tmp_path / "r3"), "--recipe", "auto",
                                  "--lr", "0.1"])
    assert r3.exit_code == 2 and "--lr set the tutorial's recipe; drop them or --recipe auto" in r3.output


def test_folds_use_train_only(tmp_path):
    """--folds with a sweep: val labels permuted, the same CV numbers, choice and weights (last epoch kept)."""
    runs = []
    for name, perm in (("a", None), ("b", np.random.default_rng(2).permutation(30))):
        (tmp_path / name).mkdir()
        cache, *_ = _cache(tmp_path / name, val_perm=perm)
        runs.append(_train(cache, tmp_path / f"r{name}", "--folds", "3", "--epochs", "3", "--lr", "0.0001,0.01"))
    (_, ma, sa), (_, mb, sb) = runs
    assert ma["cv"]["n"] == 60 and ma["cv"]["on"] == "train"
    assert ma["cv"] == {**mb["cv"], "seconds": ma["cv"]["seconds"]}
    assert ma["chosen"] == mb["chosen"] and ma["best_epoch"] == 2 and ma["val_unbiased"] is True
    assert torch.equal(sa["weight"], sb["weight"])


def test_balanced_accuracy_matches_sklearn_and_drives_the_choice(tmp_path):
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    g = np.random.default_rng(0)
    y, p = g.integers(0, 4, 200), g.integers(0, 4, 200)
    p[:120] = y[:120]
    ci = balanced_accuracy_ci(confusion_matrix(y, p, labels=range(5)))  # a class with no rows is left out
    assert ci["value"] == pytest.approx(balanced_accuracy_score(y, p)) and ci["classes"] == 4
    assert ci["low"] < ci["value"] < ci["high"]
    cache, X, y, n = _cache(tmp_path, counts={0: 60, 1: 15, 2: 15}, spread=8.0)
    r, m, sd = _train(cache, tmp_path / "run")
    assert m["selection"]["metric"] == "balanced_accuracy"  # imbalanced train classes: chosen by it
    pred = (torch.tensor(X[n:]) @ sd["weight"].T + sd["bias"]).argmax(1).numpy()
    assert m["balanced_accuracy"]["val"] == pytest.approx(balanced_accuracy_score(y[n:], pred))
    assert f"balanced accuracy {m['balanced_accuracy']['val']:.4f} (95% CI" in r.output
    _, mw, _ = _train(cache, tmp_path / "weighted", "--class-weight", "balanced")
    counts = np.bincount(y[:n], minlength=3)
    assert mw["class_weight"]["weights"] == pytest.approx(n / (3 * counts))


def test_class_weights_by_hand_and_in_the_loss():
    y = np.array([0, 0, 0, 1, 2, 2])
    assert class_weights(y, 3) == pytest.approx([6 / (3 * 3), 6 / (3 * 1), 6 / (3 * 2)])
    # one full-batch SGD step with class weights = autograd on mean(w[y] * CE)
    X, yy = blobs({0: 9, 1: 3}, dim=8, spread=2.0)
    w = class_weights(yy, 2)
    p = HeadParams(epochs=1, batch_size=len(yy), lr=0.1, momentum=0.0)
    (r,), _ = train_heads((X, yy), (X, yy), 2, [p], class_weight=w)
    W0, b0 = init_linear(8, 2, 0)
    lin = nn.Linear(8, 2)
    with torch.no_grad():
        lin.weight.copy_(W0)
        lin.bias.copy_(b0)
    loss = (torch.tensor(w)[torch.tensor(yy)]
            * nn.functional.cross_entropy(lin(torch.tensor(X)), torch.tensor(yy), reduction="none")).mean()
    loss.backward()
    torch.testing.assert_close(r.last_weight, W0 - 0.1 * lin.weight.grad, rtol=1e-5, atol=1e-6)


def test_probe_folds_equal_each_fold_alone_and_fold_standardisation():
    X, y = blobs({0: 20, 1: 20, 2: 20}, dim=12, spread=3.0)
    X = X * np.linspace(0.1, 10, 12, dtype=np.float32) + 5  # uneven scales: standardising matters
    folds = stratified_folds(y, 3, seed=0)
    p = ProbeParams(lr=0.05, epochs=4, batch_size=8, weight_decay=1e-3)
    (runs,), _ = train_probes(X, y, 3, [p], folds)
    assert [r.fold for r in runs] == [0, 1, 2]
    # a fold's head sees exactly its own rows: removing the held-out rows' labels changes nothing
    y2 = y.copy()
    y2[folds == 1] = (y2[folds == 1] + 1) % 3
    (runs2,), _ = train_probes(X, y2, 3, [p], folds)
    torch.testing.assert_close(runs[1].weight, runs2[1].weight)
    assert not torch.allclose(runs[0].weight, runs2[0].weight)
    # the saved layer works on raw features: its logits equal the standardised layer's
    (full,), _ = train_probes(X, y, 3, [p])
    assert full[0].fold == -1 and full[0].weight.shape == (3, 12)
    acc = ((torch.tensor(X) @ full[0].weight.T + full[0].bias).argmax(1).numpy() == y).mean()
    assert acc > 0.9


def test_run_defaults_to_auto_and_its_head_flags_select_the_tutorial(tiny_data, tmp_path):
    r = CliRunner().invoke(cli, ["run", str(tiny_data), "--out", str(tmp_path / "a"), "--weights", "none",
                                 "--workers", "0", "--no-plots"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "a/metrics.json").read_text())
    assert m["recipe_mode"] == "auto" and m["selection"]["n"] == 6 and m["selection"]["on"] == "train"
    # extract's --batch-size and --seed are not recipe flags; --head-batch-size is
    r = CliRunner().invoke(cli, ["run", str(tiny_data), "--out", str(tmp_path / "b"), "--weights", "none",
                                 "--workers", "0", "--no-plots", "--batch-size", "2", "--head-batch-size", "2"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "b/metrics.json").read_text())
    assert m["recipe_mode"] == "tutorial" and m["recipe"]["batch_size"] == 2
    r = CliRunner().invoke(cli, ["run", str(tiny_data), "--out", str(tmp_path / "c"), "--recipe", "auto",
                                 "--head-batch-size", "2"])
    assert r.exit_code == 2 and "--head-batch-size set the tutorial's recipe" in r.output
