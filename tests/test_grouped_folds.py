"""Copies of one photo stay in one cross-validation fold (recipe choice, temperature, learning curve, audit);
the --folds sweep table shows the kept head; CV draws the views the kept head draws; constant features say so."""
import hashlib
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import cli
from pipeline.audit import AuditConfig, gather_rows, out_of_fold_issues, run_audit
from pipeline.folds import copies_record, grouped_folds, split_copy_groups, stratified_folds, units
from pipeline.head import HeadParams, train_folds
from pipeline.learning_curve import learning_curve, share_rows
from pipeline.train_head import HeadConfig, cross_validate, run_train_head
from tests.synthetic_cache import blobs, write_cache

PIN_Y = np.array([0, 1, 2, 0, 1, 0, 0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 1, 2, 0, 0])


def test_without_copies_the_folds_and_shares_are_the_ones_before_grouping():
    """Pinned from the code before copies were grouped (head.stratified_folds, learning_curve.share_rows)."""
    before_5_0 = [2, 1, 4, 3, 4, 2, 4, 2, 0, 4, 0, 1, 3, 1, 3, 3, 2, 0, 1, 0]
    before_3_7 = [1, 2, 0, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0, 2, 0, 2, 2, 2, 2, 0]
    singletons = np.arange(len(PIN_Y))
    for groups in (None, singletons, singletons * 7 + 3):
        assert grouped_folds(PIN_Y, 5, 0, groups).tolist() == before_5_0
        assert grouped_folds(PIN_Y, 3, 7, groups).tolist() == before_3_7
        heads = share_rows(PIN_Y, shares=(0.3, 1.0), repeats=2, seed=1, groups=groups)
        assert [(s, r, rows.tolist()) for s, r, rows in heads] == [
            (0.3, 0, [0, 2, 3, 4, 7, 16, 18]), (1.0, 0, list(range(20))), (0.3, 1, [1, 4, 5, 10, 11, 12, 15])]
    assert stratified_folds(PIN_Y, 5, 0).tolist() == before_5_0


def test_grouped_folds_keep_each_group_whole_stratified_and_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    groups = np.arange(300)
    groups[150:] = rng.integers(0, 150, 150)  # half the rows copy one of the first 150
    y[150:] = y[groups[150:]]
    f = grouped_folds(y, 5, 0, groups)
    for g in np.unique(groups):
        assert len(set(f[groups == g])) == 1  # a photo's copies in one fold
    sizes = np.bincount(f, minlength=5)
    assert sizes.max() - sizes.min() <= 4  # balanced within a group's size or so
    for c in range(3):
        per = np.bincount(f[y == c], minlength=5)
        assert per.max() - per.min() <= 4
    assert np.array_equal(f, grouped_folds(y, 5, 0, groups))
    assert not np.array_equal(f, grouped_folds(y, 5, 1, groups))
    # a group copied under two classes is one unit (its most common label), never split
    y2 = y.copy()
    y2[np.flatnonzero(groups == groups[200])[-1]] = (y[200] + 1) % 3
    f2 = grouped_folds(y2, 5, 0, groups)
    assert len(set(f2[groups == groups[200]])) == 1
    from pipeline import PipelineError
    with pytest.raises(PipelineError, match="cannot make 3 folds of 2 distinct images"):
        grouped_folds([0, 0, 1, 1], 3, 0, [0, 0, 1, 1])


# --------------------------------------------------------------------------- the recipe's CV on a doubled train

def _doubled(tmp_path):
    """Overlapping blobs (honest accuracy about 0.7): the same 80 train photos once, and every one twice."""
    X, y = blobs({0: 60, 1: 60}, dim=128, spread=24.0, seed=3)
    o = np.random.default_rng(0).permutation(len(y))
    X, y = X[o], y[o]
    val = (X[80:], y[80:], [f"val/{c}/v_{i}.jpg" for i, c in enumerate(y[80:])])

    def cache(name, Xt, yt):
        paths = [f"train/{c}/img_{i}.jpg" for i, c in enumerate(yt)]
        return write_cache(tmp_path / name, {"train": (Xt, yt, paths), "val": val}, ["a", "b"])

    return (cache("single.h5", X[:80], y[:80]),
            cache("double.h5", np.concatenate([X[:80], X[:80]]), np.concatenate([y[:80], y[:80]])))


def test_doubled_train_cv_reads_the_honest_figure_and_says_so(tmp_path):
    single, double = _doubled(tmp_path)
    ms = run_train_head(HeadConfig(cache=str(single), out=str(tmp_path / "rs"), recipe="auto", plots=False))
    md = run_train_head(HeadConfig(cache=str(double), out=str(tmp_path / "rd"), recipe="auto", plots=False))
    cv = {k: m["selection"]["candidates"][m["selection"]["chosen"]]["cv"] for k, m in (("s", ms), ("d", md))}
    # measured: single 0.738, doubled 0.725 (0.925 before copies were kept together; its val accuracy 0.625)
    assert abs(cv["d"] - cv["s"]) <= 0.06 and cv["d"] < 0.8
    assert md["selection"]["copies_in_one_fold"] == {"rows": 160, "groups": 80}
    assert ms["selection"]["copies_in_one_fold"] == {"rows": 0, "groups": 0}
    line = "copies kept together: 160 train rows are 80 photos present more than once"
    assert line in (tmp_path / "rd/report.txt").read_text() and line in md["report_text"]
    assert "copies kept together" not in ms["report_text"]
    # the temperature is fitted on these out-of-fold logits: they score the honest figure too
    from cache import read_cache

    c = read_cache(double)
    tr = c.splits["train"]
    groups = split_copy_groups(c)
    sel = cross_validate(tr.features, tr.labels, 2, [HeadParams(epochs=5)], 5, 0, "accuracy", "cpu", groups=groups)
    _, logits, labels = sel.oof
    apart = cross_validate(tr.features, tr.labels, 2, [HeadParams(epochs=5)], 5, 0, "accuracy", "cpu")
    assert (logits.argmax(1) == labels).mean() < (apart.oof[1].argmax(1) == labels).mean() - 0.1


def test_byte_copies_from_the_cache_digests_are_grouped(tmp_path):
    """Same bytes, different features (e.g. a GPU's nondeterminism): grouped by the sha256 the cache records."""
    X, y = blobs({0: 10, 1: 10}, dim=8)
    digest = [hashlib.sha256(str(i % 15).encode()).hexdigest() for i in range(20)]  # rows 15-19 copy 0-4
    y[15:] = y[:5]
    path = write_cache(tmp_path / "c.h5", {"train": (X, y, [f"t{i}.jpg" for i in range(20)]),
                                           "val": (X[:4], y[:4], [f"v{i}.jpg" for i in range(4)])}, ["a", "b"],
                       digests={"train": digest})
    from cache import read_cache

    groups = split_copy_groups(read_cache(path))
    assert groups[15:].tolist() == [0, 1, 2, 3, 4] and copies_record(groups) == {"rows": 10, "groups": 5}
    m = run_train_head(HeadConfig(cache=str(path), out=str(tmp_path / "r"), recipe="tutorial", folds=3, epochs=(2,),
                                  plots=False))
    assert m["selection"]["copies_in_one_fold"] == {"rows": 10, "groups": 5}


# --------------------------------------------------------------------------- audit

def test_audit_finds_label_flips_that_have_a_copy(tmp_path):
    X, y = blobs({0: 60, 1: 60}, dim=128, spread=2.0, seed=5)
    o = np.random.default_rng(1).permutation(len(y))
    X, y = X[o], y[o].copy()
    with_copy, without = list(range(0, 50, 5)), list(range(105, 120, 3))
    y[with_copy + without] = 1 - y[with_copy + without]  # the photo is misfiled, every copy of it too
    Xt, yt = np.concatenate([X, X[:50]]), np.concatenate([y, y[:50]])  # rows 0-49 twice
    paths = [f"train/{c}/img_{i}.jpg" for i, c in enumerate(yt)]
    cache = write_cache(tmp_path / "c.h5", {"train": (Xt, yt, paths), "val": (X[:4], y[:4], ["v0", "v1", "v2", "v3"])},
                        ["a", "b"])
    a = run_audit(AuditConfig(cache=str(cache), out=str(tmp_path / "audit"), pictures=False, top=1000))
    flagged = {r["path"] for r in a.label_issues}
    found = sum(paths[i] in flagged and paths[120 + i] in flagged for i in with_copy)
    assert found >= 8 and sum(paths[i] in flagged for i in without) >= 4  # measured: 9 of 10 and 4 of 5
    assert a.scored["copies_in_one_fold"] == {"rows": 100, "groups": 50}
    saved = json.loads((tmp_path / "audit/audit.json").read_text())
    assert saved["scored"]["copies_in_one_fold"] == {"rows": 100, "groups": 50}
    assert "100 rows of 50 photos with copies kept in one fold each" in (tmp_path / "audit/report.txt").read_text()
    # the same scores with copies split across folds (as before): the copy in the training folds vouches for
    # the wrong label
    from cache import read_cache

    rows = gather_rows(read_cache(cache))
    apart, _ = out_of_fold_issues(rows, AuditConfig(cache="", out=""), [])
    flagged_apart = {r["path"] for r in apart if r["_flip"] and r["score"] >= 0.5}
    assert sum(paths[i] in flagged_apart for i in with_copy) <= 3  # measured 2 of 10


# --------------------------------------------------------------------------- learning curve

def test_learning_curve_shares_draw_photos_with_all_their_copies():
    rng = np.random.default_rng(2)
    y = np.repeat(rng.integers(0, 2, 40), 3)  # 40 photos, 3 copies each, copies adjacent
    groups = np.repeat(np.arange(40), 3)
    for s, _, rows in share_rows(y, shares=(0.2, 0.5, 1.0), repeats=2, seed=0, groups=groups):
        kept = set(groups[rows].tolist())
        assert len(rows) == 3 * len(kept)  # whole photos only
        per_class = [len({g for g in kept if y[3 * g] == c}) for c in (0, 1)]
        n = [int((y[::3] == c).sum()) for c in (0, 1)]
        assert per_class == [max(1, round(s * k)) for k in n]
    X, _ = blobs({0: 60, 1: 60}, dim=8, seed=1)
    X = np.repeat(X[::3][:40], 3, axis=0)
    rec = learning_curve(X, y, X[:20], y[:20], 2, HeadParams(epochs=2), shares=(0.5, 1.0), repeats=1, groups=groups)
    full = rec["points"][-1]
    assert full["rows"] == 120 and full["photos"] == 40 and full["per_class"] == pytest.approx(20.0)
    assert rec["copies"] == {"rows": 120, "groups": 40}
    unit, label, sizes = units(y, groups)
    assert sizes.tolist() == [3] * 40 and label.tolist() == y[::3].tolist() and unit[:6].tolist() == [0, 0, 0, 1, 1, 1]


# --------------------------------------------------------------------------- item 6: what the sweep keeps, views

def _folds_cache(tmp_path, views=None, name="c.h5"):
    X, y = blobs({0: 24, 1: 24}, dim=16, spread=3.0, seed=4)
    o = np.random.default_rng(3).permutation(len(y))
    X, y = X[o], y[o]
    paths = [f"c{c}/img_{i}.jpg" for i, c in enumerate(y)]
    V = None if views is None else views(X[:36])
    return write_cache(tmp_path / name, {"train": (X[:36], y[:36], paths[:36]), "val": (X[36:], y[36:], paths[36:])},
                       ["a", "b"], views=V), X[:36], y[:36], V


def test_folds_sweep_table_shows_the_kept_head(tmp_path):
    path, *_ = _folds_cache(tmp_path)
    r = CliRunner().invoke(cli, ["train-head", str(path), "--out", str(tmp_path / "run"), "--folds", "3",
                                 "--epochs", "6", "--lr", "0.0001,0.003,0.05", "--no-plots"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "run/metrics.json").read_text())
    assert m["best_epoch"] == 5 and all(row["best_epoch"] == 5 for row in m["sweep"])
    assert m["sweep"][m["chosen"]]["best_val_acc"] == pytest.approx(m["best_val_acc"])
    lines = r.output.splitlines()
    head = next(i for i, line in enumerate(lines) if "cv_mean" in line)
    assert "kept_val_acc" in lines[head] and lines[head].endswith("kept_epoch")
    best = next(line for line in lines[head + 1:head + 4] if line.endswith("<- best"))
    assert float(best.split()[3]) == pytest.approx(m["best_val_acc"], abs=5e-5) and best.split()[-3] == "5"


def test_cv_draws_views_from_the_training_rows_only(tmp_path):
    X, y = blobs({0: 12, 1: 12}, dim=8, spread=2.0, seed=1)
    V = np.stack([X + np.random.default_rng(k).normal(0, 2, X.shape).astype(np.float32) for k in range(3)], 1)
    folds = stratified_folds(y, 3, 0)
    p = [HeadParams(epochs=3)]
    (runs,), _ = train_folds(X, y, 2, p, folds, views=V)
    poisoned = V.copy()
    poisoned[folds == 1] = 1e6  # the held-out fold's views: never drawn by the head scored on it
    (again,), _ = train_folds(X, y, 2, p, folds, views=poisoned)
    assert torch.allclose(runs[1].weight, again[1].weight) and runs[1].heldout_acc == again[1].heldout_acc
    assert not torch.allclose(runs[0].weight, again[0].weight)  # fold 0's head trains on fold 1's rows
    (plain,), _ = train_folds(X, y, 2, p, folds)
    assert not torch.allclose(runs[0].weight, plain[0].weight)


def test_folds_cv_trains_with_the_views_the_kept_head_trains_with(tmp_path):
    def views(X):
        return np.stack([X + np.random.default_rng(k).normal(0, 4, X.shape).astype(np.float32) for k in range(2)], 1)

    path, X, y, V = _folds_cache(tmp_path, views)
    m = run_train_head(HeadConfig(cache=str(path), out=str(tmp_path / "r"), folds=3, epochs=(3,), lr=(0.001, 0.01),
                                  plots=False))
    assert m["views_used"] is True
    with_views = cross_validate(X, y, 2, [HeadParams(epochs=3, lr=lr) for lr in (0.001, 0.01)], 3, 0, "accuracy",
                                "cpu", views=V)
    without = cross_validate(X, y, 2, [HeadParams(epochs=3, lr=lr) for lr in (0.001, 0.01)], 3, 0, "accuracy", "cpu")
    got = [c["cv_logloss"] for c in m["selection"]["candidates"]]
    assert got == pytest.approx([pl[1] for pl in with_views.pooled], rel=1e-5)
    assert got != pytest.approx([pl[1] for pl in without.pooled], rel=1e-3)


# --------------------------------------------------------------------------- item 13: constant features

def test_constant_features_say_the_features_carry_no_information(tmp_path):
    """Constant features read 'T 20: every out-of-fold prediction right or wrong'; now: CV refuses them in one line
    (every row is a copy of one photo to the features), audit notes it, and a temperature fit on logits that are
    the same for every row says why it has nothing to fit."""
    from pipeline.calibration import calibrate, no_signal

    y = np.array([0, 1] * 15)
    X = np.ones((30, 8), np.float32)
    path = write_cache(tmp_path / "c.h5", {"train": (X[:20], y[:20], [f"t{i}.jpg" for i in range(20)]),
                                           "val": (X[20:], y[20:], [f"v{i}.jpg" for i in range(10)])}, ["a", "b"])
    for args in ([], ["--recipe", "tutorial", "--folds", "3"]):
        r = CliRunner().invoke(cli, ["train-head", str(path), "--out", str(tmp_path / "r"), "--no-plots", *args])
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert "the 20 train images all have the same features: they carry no information" in r.output
    a = run_audit(AuditConfig(cache=str(path), out=str(tmp_path / "audit"), pictures=False))
    assert "label issues skipped: the 20 train images are copies of one photo" in " ".join(a.notes)
    logits = np.tile([[0.3, -0.2]], (20, 1))  # the same for every row: T runs to 20
    cal = calibrate(logits, y[:20], "oof", {"val": (logits[:10], y[:10])})
    why = cal.record["not_fitted"]
    assert cal.temperature is None and "T 20" in why and "right or wrong" not in why
    assert "the features carry no information that tells the photos apart" in why
    z = np.array([[3.0, 0.0], [0.0, 2.0], [4.0, 1.0]])
    assert no_signal(z, np.array([0, 1, 0]), 0.05) == "every out-of-fold prediction right"
    assert no_signal(z, np.array([1, 0, 1]), 20.0) == "every out-of-fold prediction wrong"
