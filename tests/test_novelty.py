"""Novelty: photos of none of the known classes told apart (pipeline/novelty.py), stored with head runs,
used by predict (--json, the table, --max-novelty, --sort-into OUT/unknown/) and export."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import cli
from pipeline.novelty import NoveltyRecordError, fit_novelty, from_record, run_novelty
from tests.synthetic_cache import write_cache


def blobs(n_per: int, classes: int, dim: int = 48, seed: int = 0, spread: float = 1.0, offset: int = 0):
    """Gaussian classes around fixed random centres (centre k is the same for every call of a dim): rows, labels."""
    centres = np.random.default_rng(123).normal(0, 3.0, (12, dim)) + 6.0  # positive: no unit-norm flips
    rng = np.random.default_rng(seed)
    X = np.concatenate([centres[offset + c] + rng.normal(0, spread, (n_per, dim)) for c in range(classes)])
    return X.astype(np.float32), np.repeat(np.arange(classes), n_per)


def auroc(known, unknown) -> float:
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(unknown))], np.r_[known, unknown])


def test_planted_unknowns_rank_above_known_and_the_threshold_passes_what_it_claims():
    X, y = blobs(60, 3)
    m = fit_novelty(X, y, np.arange(len(y)) % 10)
    known, _ = blobs(200, 3, seed=1)  # fresh photos of the known classes
    unknown, _ = blobs(200, 2, seed=2, offset=3)  # two classes train never saw
    sk, su = m.score(known), m.score(unknown)
    assert auroc(sk, su) > 0.99
    assert m.pass_share(m.threshold) == pytest.approx(0.95, abs=0.011)  # held-in (out-of-fold) train: as set
    assert 0.88 <= float((sk <= m.threshold).mean()) <= 1.0  # fresh known photos pass about as often
    assert float((su > m.threshold).mean()) > 0.9


def test_the_score_beats_the_maximum_probability_on_a_near_unknown():
    """The head is surest far from its boundary: a class beyond one known class scores a high maximum
    probability, yet its photos are unlike every training photo."""
    from sklearn.linear_model import LogisticRegression

    X, y = blobs(80, 4, seed=3)
    known, yk = blobs(150, 4, seed=5)
    centres = np.stack([X[y == c].mean(0) for c in range(4)])
    beyond = centres[0] + 1.0 * (centres[0] - centres.mean(0))  # past class 0, away from the others
    unknown = (beyond + np.random.default_rng(4).normal(0, 1.0, (150, X.shape[1]))).astype(np.float32)
    head = LogisticRegression(max_iter=2000).fit(X, y)
    msp = lambda A: -head.predict_proba(A).max(1)  # noqa: E731  higher = less sure, as a novelty
    m = fit_novelty(X, y, np.arange(len(y)) % 10)
    assert auroc(m.score(known), m.score(unknown)) >= auroc(msp(known), msp(unknown)) + 0.02


def test_copies_in_one_fold_keep_the_threshold_honest():
    """Every train photo twice, more feature dimensions than photos (as 1,280-d features of a few hundred
    photos): folds that split copies score each photo by a model that saw its copy, set a threshold too low,
    and flag most fresh known photos."""
    X, y = blobs(40, 3, seed=6, dim=200)
    X2, y2 = np.concatenate([X, X]), np.concatenate([y, y])
    groups = np.concatenate([np.arange(len(y)), np.arange(len(y))])
    from pipeline.folds import grouped_folds

    fresh, _ = blobs(300, 3, seed=7, dim=200)
    i = np.arange(len(y2))
    split = fit_novelty(X2, y2, (i + (i >= len(y))) % 10)  # copies i and i + 120 land in different folds
    kept = fit_novelty(X2, y2, grouped_folds(y2, 10, 0, groups))
    assert float((kept.score(fresh) > kept.threshold).mean()) < 0.12
    assert float((split.score(fresh) > split.threshold).mean()) > 0.5


def test_record_round_trip_and_tampered_records():
    X, y = blobs(30, 2)
    m = fit_novelty(X, y, np.arange(len(y)) % 5)
    rec = m.record()
    again = from_record(rec, X.shape[1])
    np.testing.assert_allclose(again.score(X), m.score(X), rtol=1e-5, atol=1e-5)
    assert from_record(None) is None
    with pytest.raises(NoveltyRecordError, match="do not fit together"):
        from_record({**rec, "whiten": rec["whiten"][:, :3]})
    with pytest.raises(NoveltyRecordError, match="the backbone's 7 features"):
        from_record(rec, 7)
    with pytest.raises(NoveltyRecordError, match="non-finite"):
        from_record({**rec, "scale": float("nan")})
    with pytest.raises(NoveltyRecordError, match="method"):
        from_record({**rec, "method": "something else"})
    with pytest.raises(NoveltyRecordError, match="is a list, not a mapping"):
        from_record([1, 2])
    for dtype in (torch.complex64, torch.int32):  # no silent cast (a ComplexWarning, other novelty values)
        with pytest.raises(NoveltyRecordError, match="whiten are not real floating point"):
            from_record({**rec, "whiten": rec["whiten"].to(dtype)})
    with pytest.raises(NoveltyRecordError, match="and 2 classes"):  # 5 class means for a run of 2 classes
        from_record({**rec, "class_means": torch.zeros(5, rec["class_means"].shape[1])}, None, 2)


def test_too_few_train_photos_give_no_model_and_say_so():
    X, y = blobs(3, 2)
    r = run_novelty(X, y, np.arange(len(y)) % 2, {"val": X})
    assert r.model is None and r.picture() is None and "needs 10 or more" in r.lines[0]


def test_train_head_records_novelty_and_flags_a_held_out_class(tmp_path):
    Xtr, ytr = blobs(40, 3, seed=8)
    Xv, yv = blobs(20, 3, seed=9)
    cache = write_cache(tmp_path / "c.h5", {"train": (Xtr, ytr, [f"t{i}.png" for i in range(len(ytr))]),
                                            "val": (Xv, yv, [f"v{i}.png" for i in range(len(yv))])}, ["a", "b", "c"])
    r = CliRunner().invoke(cli, ["train-head", str(cache), "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    nov = metrics["novelty"]
    assert nov["threshold"] == 1.0 and nov["held_in_pass"] == pytest.approx(0.95, abs=0.02)
    assert nov["flagged"]["val"]["n"] == 60 and nov["flagged"]["val"]["flagged"] <= 6
    report = (tmp_path / "run/report.txt").read_text()
    assert "novelty: photos above 1.00 are called unknown" in report and "val " in report
    assert (tmp_path / "run/novelty.png").stat().st_size > 5000
    m = from_record(torch.load(tmp_path / "run/model.pt", weights_only=True)["novelty"], Xtr.shape[1])
    unknown, _ = blobs(50, 1, seed=10, offset=5)
    assert float((m.score(unknown) > m.threshold).mean()) > 0.9


@pytest.fixture(scope="module")
def novelty_run(tmp_path_factory):
    from tests.conftest import head_run_folder

    layout = {"train": {"ants": 6, "bees": 6}, "val": {"ants": 2, "bees": 2}}
    return head_run_folder(tmp_path_factory.mktemp("nov"), layout, "--epochs", "2")


def _predict_json(run, files, *flags):
    r = CliRunner().invoke(cli, ["predict", str(run), *map(str, files), "--json", *flags])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), r


def test_predict_gives_novelty_and_unknown_with_the_best_guess(novelty_run):
    data, run = novelty_run
    files = sorted((data / "val").rglob("*.jpg"))
    rows, _ = _predict_json(run, files)
    assert all(isinstance(p["novelty"], float) for p in rows)
    threshold = json.loads((run / "metrics.json").read_text())["novelty"]["threshold"]
    for p in rows:
        assert (p["class"] == "unknown") == (p["novelty"] > threshold)
    rows, _ = _predict_json(run, files, "--max-novelty", "-1000")  # every photo is stranger than this
    assert all(p["class"] == "unknown" and p["unknown"] is True and p["best_guess"] in ("ants", "bees")
               and p["probability"] == p["probabilities"][p["best_guess"]] for p in rows)
    rows, _ = _predict_json(run, files, "--max-novelty", "1e9")
    assert all(p["class"] in ("ants", "bees") and "unknown" not in p for p in rows)
    r = CliRunner().invoke(cli, ["predict", str(run), str(files[0]), "--max-novelty", "-1000"])
    assert r.exit_code == 0 and "novelty" in r.stdout.splitlines()[0]
    assert "unknown" in r.stdout.splitlines()[1] and "(best guess: " in r.stdout.splitlines()[1]


def test_sort_into_fills_unknown(novelty_run, tmp_path):
    data, run = novelty_run
    out = tmp_path / "sorted"
    r = CliRunner().invoke(cli, ["predict", str(run), str(data / "val"), "--sort-into", str(out),
                                 "--max-novelty", "-1000"])
    assert r.exit_code == 0, r.output
    assert len(list((out / "unknown").iterdir())) == len(list((data / "val").rglob("*.jpg"))) == 4
    assert not (out / "ants").exists() and not (out / "bees").exists()
    import csv

    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert {r["class"] for r in rows} == {"unknown"} == {r["flag"] for r in rows}
    assert all(float(r["novelty"]) > -1000 and r["best_class"] in ("ants", "bees") for r in rows)


def test_a_run_without_novelty_predicts_as_before_with_a_note(novelty_run, tmp_path):
    import shutil

    data, run = novelty_run
    old = tmp_path / "old"
    shutil.copytree(run, old)
    m = torch.load(old / "model.pt", weights_only=True)
    del m["novelty"]
    torch.save(m, old / "model.pt")
    rows, r = _predict_json(old, [data / "val/ants/img_000.jpg"])
    assert "novelty" not in rows[0] and rows[0]["class"] in ("ants", "bees")
    assert "no novelty model" in r.stderr


def test_a_tampered_novelty_record_is_one_line(novelty_run, tmp_path):
    import shutil

    data, run = novelty_run
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    m = torch.load(bad / "model.pt", weights_only=True)
    m["novelty"]["whiten"] = m["novelty"]["whiten"][:5]
    torch.save(m, bad / "model.pt")
    r = CliRunner().invoke(cli, ["predict", str(bad), str(data / "val/ants/img_000.jpg")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "is not a usable model file: novelty arrays of shapes" in r.output


def test_export_returns_the_novelty_as_its_second_output(novelty_run, tmp_path):
    from PIL import Image
    from torchvision import transforms as T

    from pipeline.predict import predict

    data, run = novelty_run
    out = tmp_path / "m.pt2"
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    extra = {"novelty.json": ""}
    prog = torch.export.load(str(out), extra_files=extra).module()
    assert json.loads(extra["novelty.json"])["threshold"] == 1.0
    f = data / "val/bees/img_000.jpg"
    x = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])(Image.open(f).convert("RGB"))[None]
    with torch.no_grad():
        probs, novelty = prog(torch.cat([x, x, x]))  # a batch size other than the export's
    want = predict(str(run), [str(f)], device="cpu")[0]
    assert novelty.shape == (3,)
    assert float(novelty[0]) == pytest.approx(want.novelty, rel=1e-3, abs=1e-3)
    assert float(probs[0].max()) == pytest.approx(want.probability, abs=1e-4)


def test_fewer_rows_than_features_is_exactly_the_full_space_score():
    """With N < D the model lives in train's span (k = N) plus ridge x I outside it: the same numbers as the
    relative Mahalanobis distance computed with D x D covariances."""
    from pipeline.novelty import RELATIVE_WEIGHT, SHRINK

    X, y = blobs(10, 3, dim=64, seed=11)  # 30 rows, 64 dims
    m = fit_novelty(X, y, np.arange(len(y)) % 5)
    assert m.basis.shape == (64, 30)
    Z = X / np.linalg.norm(X, axis=1, keepdims=True)
    means = np.stack([Z[y == c].mean(0) for c in range(3)])
    within = (Z - means[y]).T @ (Z - means[y]) / len(Z)
    ridge = np.trace(within) / 64 * SHRINK
    total = np.cov(Z.T, bias=True)
    P, Pg = np.linalg.inv(within + ridge * np.eye(64)), np.linalg.inv(total + ridge * np.eye(64))
    Q, _ = blobs(7, 4, dim=64, seed=12)  # new rows, partly outside train's span
    Qz = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    dm = np.stack([np.einsum("ij,jk,ik->i", Qz - mu, P, Qz - mu) for mu in means], 1).min(1)
    dg = np.einsum("ij,jk,ik->i", Qz - Z.mean(0), Pg, Qz - Z.mean(0))
    np.testing.assert_allclose(m.raw(Q), dm - RELATIVE_WEIGHT * dg, rtol=2e-4, atol=2e-3 * np.abs(dm).max() * 1e-3)
