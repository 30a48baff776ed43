"""audit: planted duplicates, label flips and outliers are found; clean data reports nothing; bad input is one line."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from pipeline import PipelineError
from pipeline.audit import AuditConfig, neighbour_search, run_audit, unit_rows
from tests.synthetic_cache import blobs, write_cache


# --------------------------------------------------------------------------- synthetic features


def blob_cache(tmp_path, n_train=60, n_val=20, classes=3, flips=(), val_flips=(), outlier=None, spread=2.0,
               name="c.h5", dim=32):
    """Train/val blobs; flips: train rows whose label is moved to the next class; outlier: a train row
    moved far from every class."""
    per = {c: (n_train + n_val) // classes for c in range(classes)}
    X, y = blobs(per, dim=dim, spread=spread, seed=3)
    order = np.random.default_rng(4).permutation(len(y))
    X, y = X[order], y[order].copy()
    val = np.zeros(len(y), bool)
    for c in range(classes):  # stratified val rows: the last n_val/classes of each class
        val[np.flatnonzero(y == c)[-(n_val // classes):]] = True
    tr, va = np.flatnonzero(~val), np.flatnonzero(val)
    names = [f"c{c}" for c in range(classes)]
    ytr, yva = y[tr].copy(), y[va].copy()
    for i in flips:
        ytr[i] = (ytr[i] + 1) % classes
    for i in val_flips:
        yva[i] = (yva[i] + 1) % classes
    Xtr = X[tr].copy()
    if outlier is not None:
        Xtr[outlier] = np.random.default_rng(9).normal(0, 1, dim) * 30
    ptr = [f"train/{names[c]}/img_{i:03d}.jpg" for i, c in enumerate(y[tr])]
    pva = [f"val/{names[c]}/img_{i:03d}.jpg" for i, c in enumerate(y[va])]
    return write_cache(tmp_path / name, {"train": (Xtr, ytr, ptr), "val": (X[va], yva, pva)}, names,
                       data_dir=str(tmp_path / "no_such_folder")), ptr, pva


def audit(tmp_path, cache, **kw):
    return run_audit(AuditConfig(cache=str(cache), out=str(tmp_path / "audit"), **kw))


def test_neighbour_search_equals_brute_force_in_blocks():
    X = np.random.default_rng(0).normal(0, 1, (53, 8)).astype(np.float32)
    X[40] = X[3] * 1.01  # one planted pair (scale does not change the cosine)
    F = unit_rows(X)
    sims, idx, pairs = neighbour_search(F, 4, threshold=0.6, block=7)  # 8 x 8 tiles, ragged last one
    # the reference in float64: a tiled float32 product and the full one may differ in the last bits (BLAS
    # takes other kernel paths on other CPUs), so values are compared with a tolerance and indices by the
    # similarity they point at (two neighbours within the tolerance may come in either order)
    X64 = X.astype(np.float64) - X.astype(np.float64).mean(0)
    X64 /= np.linalg.norm(X64, axis=1, keepdims=True)
    S = X64 @ X64.T
    np.fill_diagonal(S, -np.inf)
    tol = 1e-5
    assert np.allclose(sims, -np.sort(-S, 1)[:, :4], atol=tol)
    assert np.allclose(S[np.arange(53)[:, None], idx], sims, atol=tol)  # each index carries its similarity
    assert all(len(set(r)) == 4 and i not in r for i, r in enumerate(idx.tolist()))  # distinct, never itself
    found = set(map(tuple, pairs[:, :2].astype(int).tolist()))
    clear = np.abs(S - 0.6) > tol  # pairs this close to the threshold may fall on either side of it
    expected = {tuple(p) for p in np.argwhere(np.triu((S >= 0.6) & clear, 1)).tolist()}
    borderline = {tuple(p) for p in np.argwhere(np.triu(~clear, 1)).tolist()}
    assert expected <= found and found <= expected | borderline
    assert all(i < j for i, j in found) and len(found) == len(pairs)  # each pair once
    assert len(expected) >= 5 and (3, 40) in found
    assert np.allclose(pairs[:, 2], S[pairs[:, 0].astype(int), pairs[:, 1].astype(int)], atol=tol)


def test_planted_label_flips_ranked_at_the_top(tmp_path):
    flips = list(range(0, 120, 12))  # 10 of 120 train rows
    cache, ptr, _ = blob_cache(tmp_path, n_train=120, n_val=30, flips=flips)
    a = audit(tmp_path, cache, pictures=False)
    flipped = {ptr[i] for i in flips}
    ranked = [r["path"] for r in a.label_issues]
    recall_at_10 = len(flipped & set(ranked[:10])) / len(flipped)
    assert recall_at_10 >= 0.8  # measured: 8 of the 10 flips are the top 10 (the top 7 are all flips)
    assert set(ranked[:7]) <= flipped
    assert flipped <= set(ranked[:12])  # recall 1.0 within the top 12; 15 rows pass the threshold in all
    r = a.label_issues[0]
    assert r["split"] == "train" and r["source"] == "out-of-fold" and r["score"] > 0.9
    assert r["suggested"] != r["label"]
    assert a.scored["folds"] == 5 and a.scored["rows"] == 120


def test_clean_set_reports_nothing(tmp_path):
    cache, _, _ = blob_cache(tmp_path)
    a = audit(tmp_path, cache)
    assert (a.copy_groups, a.duplicates, a.label_issues, a.outliers) == ([], [], [], [])
    assert a.copies == {"groups": 0, "files": 0, "cross_split_groups": 0, "listed": 0}
    assert a.scored["out_of_fold_accuracy"] == 1.0
    # both pictures are still written (saying nothing was found), so an older audit's pictures never linger
    assert a.pictures == ["suspects.png", "duplicates.png", "image_issues.png"]
    assert all((tmp_path / "audit" / p).stat().st_size > 0 for p in a.pictures)
    j = json.loads((tmp_path / "audit/audit.json").read_text())
    assert (j["duplicates"], j["label_issues"], j["outliers"]) == ([], [], [])
    report = (tmp_path / "audit/report.txt").read_text()
    assert "copies: 0 groups of 0 files" in report and "near duplicates: 0 pairs" in report


def test_planted_outlier_found_first(tmp_path):
    cache, ptr, _ = blob_cache(tmp_path, outlier=7)
    a = audit(tmp_path, cache, pictures=False)
    assert [o["path"] for o in a.outliers] == [ptr[7]]
    assert a.outliers[0]["z"] >= 5


def test_run_head_scores_val_images(tmp_path):
    cache, _, pva = blob_cache(tmp_path, val_flips=[2])
    r = CliRunner().invoke(cli, ["train-head", str(cache), "--out", str(tmp_path / "run"), "--no-plots"])
    assert r.exit_code == 0, r.output
    a = audit(tmp_path, cache, run=str(tmp_path / "run"), pictures=False)
    assert [(x["path"], x["source"]) for x in a.label_issues] == [(pva[2], "run")]
    assert a.scored["run_rows"] == 18 and a.scored["run_accuracy"] == pytest.approx(17 / 18)
    # without --run the val images are not scored, and the report says so
    a = audit(tmp_path, cache, pictures=False)
    assert a.label_issues == [] and any("pass --run" in n for n in a.notes)


def test_run_of_another_cache_is_refused(tmp_path):
    cache, _, _ = blob_cache(tmp_path)
    other, _, _ = blob_cache(tmp_path, name="other.h5", dim=16)
    r = CliRunner().invoke(cli, ["train-head", str(other), "--out", str(tmp_path / "run"), "--no-plots",
                                 "--epochs", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["audit", str(cache), "--out", str(tmp_path / "a"), "--run", str(tmp_path / "run")])
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: --run {tmp_path / 'run'} was trained on features of another cache")


def test_one_class_and_tiny_splits_get_notes_not_tracebacks(tmp_path):
    X = np.random.default_rng(0).normal(0, 1, (6, 8)).astype(np.float32)
    one = write_cache(tmp_path / "one.h5", {"train": (X[:4], np.zeros(4, np.int64), [f"a/{i}.jpg" for i in range(4)]),
                                            "val": (X[4:], np.zeros(2, np.int64), ["v/a.jpg", "v/b.jpg"])}, ["ants"])
    r = CliRunner().invoke(cli, ["audit", str(one), "--out", str(tmp_path / "a1"), "--json", "--knn", "6"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    assert j["label_issues"] == [] and "label issues skipped: the cache has one class" in j["notes"]
    assert "outliers skipped: 6 images, need more than --knn 6" in j["notes"]
    tiny = write_cache(tmp_path / "tiny.h5", {"train": (X[:3], np.array([0, 0, 1]), ["t/a0", "t/a1", "t/b0"]),
                                              "val": (X[3:4], np.array([1]), ["v/b0"])}, ["ants", "bees"])
    r = CliRunner().invoke(cli, ["audit", str(tiny), "--out", str(tmp_path / "a2")])
    assert r.exit_code == 0, r.output
    assert ("label issues skipped: class bees has 1 train image; cross-validation needs at least 2 per class"
            in r.output)
    assert "data folder not found" in r.output and "pass --data-dir" in r.output


def test_bad_thresholds_one_line(tmp_path):
    cache, _, _ = blob_cache(tmp_path)
    with pytest.raises(PipelineError, match="more than 100 pairs of images have similarity >= -1.0: that threshold "
                                           "is far too low for these features; raise --dup-threshold"):
        run_audit(AuditConfig(cache=str(cache), out=str(tmp_path / "b"), dup_threshold=-1.0, max_pairs=100))
    r = CliRunner().invoke(cli, ["audit", str(cache), "--out", str(tmp_path / "a"), "--dup-threshold", "2"])
    assert r.exit_code == 2 and "--dup-threshold" in r.output


@pytest.mark.parametrize("flag,value", [("--outlier-z", "nan"), ("--outlier-z", "inf"), ("--outlier-z", "-inf"),
                                        ("--dup-threshold", "nan"), ("--label-threshold", "nan")])
def test_non_finite_thresholds_are_usage_errors_before_any_work(tmp_path, flag, value):
    cache, _, _ = blob_cache(tmp_path)
    r = CliRunner().invoke(cli, ["audit", str(cache), "--out", str(tmp_path / "a"), flag, value])
    assert r.exit_code == 2, r.output
    assert f"Invalid value for '{flag}'" in r.output and "is not a finite number" in r.output
    assert not (tmp_path / "a").exists()  # nothing was written, not even an empty folder


# --------------------------------------------------------------------------- real images, random-init features


def structured_image(label: int, seed: int) -> Image.Image:
    """Smooth random shapes with a class tint: distinct images stay distinct after a resize, unlike noise."""
    g = np.random.default_rng(seed)
    small = Image.fromarray(g.uniform(0, 255, (6, 6, 3)).astype(np.uint8)).resize((96, 96), Image.BICUBIC)
    tint = np.array([[60, 0, -40], [-40, 0, 60]][label])
    arr = np.asarray(small).astype(float) * 0.7 + tint + 40 + g.normal(0, 6, (96, 96, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory):
    """16 train + 8 val images, plus three val copies of train images: the same bytes, re-encoded at
    JPEG quality 50, resized to 70%; extracted with a random-init ResNet-18."""
    from pipeline.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("planted") / "data"
    k = 0
    for split, n in (("train", 8), ("val", 4)):
        for c, cls in enumerate(["ants", "bees"]):
            for _ in range(n):
                p = root / split / cls / f"{cls}_{k:03d}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                structured_image(c, k).save(p, quality=90)
                k += 1
    (root / "val/ants/copy_exact.jpg").write_bytes((root / "train/ants/ants_000.jpg").read_bytes())
    Image.open(root / "train/bees/bees_010.jpg").save(root / "val/bees/copy_q50.jpg", quality=50)
    Image.open(root / "train/ants/ants_005.jpg").resize((67, 67), Image.LANCZOS).save(
        root / "val/ants/copy_resized.jpg", quality=85)
    cache = root.parent / "f.h5"
    extract(ExtractConfig(data_dir=str(root), cache=str(cache), weights="none", workers=0))
    return root, cache


PLANTED_NEAR = {("train/bees/bees_010.jpg", "val/bees/copy_q50.jpg"),
                ("train/ants/ants_005.jpg", "val/ants/copy_resized.jpg")}


def test_planted_cross_split_duplicates_all_found(planted_folder, tmp_path):
    root, cache = planted_folder
    r = CliRunner().invoke(cli, ["audit", str(cache), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    j = json.loads((tmp_path / "a/audit.json").read_text())
    # all three, nothing else: the exact copy as a group of two, the edited copies as near pairs
    assert j["copy_groups"] == [{"count": 2, "exact": True, "similarity": 1.0, "cross_split": True,
                                 "splits": {"train": 1, "val": 1}, "files_not_listed": 0,
                                 "files": [{"path": "train/ants/ants_000.jpg", "split": "train"},
                                           {"path": "val/ants/copy_exact.jpg", "split": "val"}]}]
    assert {(d["a"], d["b"]) for d in j["duplicates"]} == PLANTED_NEAR
    assert all(d["cross_split"] and d["similarity"] >= 0.997 for d in j["duplicates"])
    assert j["data_dir"] == str(root) and j["missing_files"] == []
    assert set(j) >= {"duplicates", "label_issues", "outliers"}
    assert "copies: 1 groups of 2 files (1 across splits)" in r.output
    assert "near duplicates: 2 pairs (2 across splits)" in r.output
    assert (tmp_path / "a/duplicates.png").stat().st_size > 1000 and (tmp_path / "a/report.txt").is_file()


def test_missing_image_files_are_named_and_drawn_as_skipped_tiles(planted_folder, tmp_path):
    import shutil

    root, cache = planted_folder
    moved = tmp_path / "data"
    shutil.copytree(root, moved)
    (moved / "val/bees/copy_q50.jpg").unlink()  # one file of a duplicate pair is gone
    r = CliRunner().invoke(cli, ["audit", str(cache), "--out", str(tmp_path / "a"), "--data-dir", str(moved)])
    assert r.exit_code == 0, r.output
    j = json.loads((tmp_path / "a/audit.json").read_text())
    assert j["missing_files"] == ["val/bees/copy_q50.jpg"]
    assert "1 of 27 files named in the cache are missing" in r.output
    # the near pair is still found from the cached features, and its picture has a tile for the missing file
    assert ("train/bees/bees_010.jpg", "val/bees/copy_q50.jpg") in {(d["a"], d["b"]) for d in j["duplicates"]}
    assert "duplicates.png" in j["pictures"]


def test_data_dir_recorded_relative_resolves_against_cache_folder(planted_folder, tmp_path, monkeypatch):
    import h5py

    root, cache = planted_folder
    import shutil

    copy = tmp_path / "f.h5"
    shutil.copy(cache, copy)
    shutil.copytree(root, tmp_path / "data")
    with h5py.File(copy, "r+") as f:
        cfg = json.loads(f.attrs["config"])
        cfg["data_dir"] = "data"  # as when extract ran from the cache's folder
        f.attrs["config"] = json.dumps(cfg)
        del f.attrs["data_root"]  # a cache made before extract recorded the absolute folder
    monkeypatch.chdir(tmp_path.parent)  # not where the data is
    a = run_audit(AuditConfig(cache=str(copy), out=str(tmp_path / "a"), pictures=False))
    assert a.data_dir == str(tmp_path / "data") and a.missing_files == []


def test_run_trained_on_another_split_of_the_same_photos_is_refused(tmp_path):
    """The same flat folder extracted with two --split-seed values: the same features (same fingerprint),
    other val images. A head trained on one cache must not score the other's val images (it trained on some)."""
    from tests.conftest import make_dataset

    flat = make_dataset(tmp_path / "flat", {".": {"ants": 5, "bees": 5}})
    for seed in ("0", "1"):
        r = CliRunner().invoke(cli, ["extract", str(flat), "--cache", str(tmp_path / f"s{seed}.h5"), "--weights",
                                     "none", "--workers", "0", "--split-seed", seed, "--val-fraction", "0.4"])
        assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["train-head", str(tmp_path / "s1.h5"), "--out", str(tmp_path / "run"), "--no-plots",
                                 "--epochs", "1"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["audit", str(tmp_path / "s0.h5"), "--out", str(tmp_path / "a"), "--run",
                                 str(tmp_path / "run"), "--no-plots"])
    assert r.exit_code == 1, r.output
    assert r.output == (f"Error: --run {tmp_path / 'run'} was trained on another split of the images (the run: a "
                        "flat-folder split (val 0.4, split seed 1); this cache: a flat-folder split (val 0.4, split "
                        "seed 0)): its val/test images are not this cache's; audit the cache it was trained on, or "
                        f"train a head on {tmp_path / 's0.h5'}\n")
    assert not (tmp_path / "a").exists()
    r = CliRunner().invoke(cli, ["audit", str(tmp_path / "s1.h5"), "--out", str(tmp_path / "b"), "--run",
                                 str(tmp_path / "run"), "--no-plots"])
    assert r.exit_code == 0, r.output


def test_thousands_of_copies_are_one_group_linear_and_bounded(tmp_path):
    """3,000 identical rows (2,990 train, 10 val) among 200 distinct ones: one group, not 4.5 million pairs
    (which used to end in "raise --dup-threshold"); audit.json stays small; near pairs still work."""
    g = np.random.default_rng(0)
    # 64-D: in 16-D, 200 random points already hold pairs twice as close as their neighbourhoods by chance
    distinct = g.normal(0, 1, (200, 64)).astype(np.float32)
    distinct[7] = distinct[3] + 0.01 * g.normal(0, 1, 64).astype(np.float32)  # one near pair
    same = np.tile(g.normal(0, 1, (1, 64)).astype(np.float32), (3000, 1))
    X = np.concatenate([distinct, same])
    paths = [f"d/{i:03d}.jpg" for i in range(200)] + [f"copy/{i:04d}.jpg" for i in range(3000)]
    val = np.zeros(len(X), bool)
    val[-10:] = True
    cache = write_cache(tmp_path / "c.h5", {"train": (X[~val], np.zeros((~val).sum(), np.int64),
                                                      [p for p, v in zip(paths, val) if not v]),
                                            "val": (X[val], np.zeros(10, np.int64), paths[-10:])}, ["ants"])
    a = run_audit(AuditConfig(cache=str(cache), out=str(tmp_path / "a"), pictures=False, max_pairs=50,
                              max_group_files=25))
    assert a.copies == {"groups": 1, "files": 3000, "cross_split_groups": 1, "listed": 1}
    (grp,) = a.copy_groups
    assert grp["count"] == 3000 and grp["splits"] == {"train": 2990, "val": 10} and grp["cross_split"]
    assert grp["similarity"] == 1.0 and not grp["exact"]  # same features; bytes unknown (no data folder)
    assert len(grp["files"]) == 25 and grp["files_not_listed"] == 2975
    assert [f["split"] for f in grp["files"][:20]] == ["train", "val"] * 10  # every val copy is listed
    assert [(d["a"], d["b"]) for d in a.duplicates] == [("d/003.jpg", "d/007.jpg")]
    assert (tmp_path / "a/audit.json").stat().st_size < 20_000
    assert "same features 1.0000  3000 files (train 2990, val 10): copy/0000.jpg" in (tmp_path / "a/report.txt").read_text()


def test_groups_listed_are_capped_and_all_counted(tmp_path):
    # 40 triples of 64-D rows (in 8-D, 40 random points hold pairs far closer than their neighbourhoods by chance)
    X = np.repeat(np.random.default_rng(1).normal(0, 1, (40, 64)).astype(np.float32), 3, axis=0)
    cache = write_cache(tmp_path / "c.h5", {"train": (X, np.zeros(120, np.int64), [f"{i}.jpg" for i in range(120)])},
                        ["ants"])
    a = run_audit(AuditConfig(cache=str(cache), out=str(tmp_path / "a"), pictures=False, max_groups=5))
    assert a.copies == {"groups": 40, "files": 120, "cross_split_groups": 0, "listed": 5}
    assert len(a.copy_groups) == 5 and all(g["count"] == 3 for g in a.copy_groups) and a.duplicates == []
    assert "  ... and 35 more groups (audit.json lists 5)" in (tmp_path / "a/report.txt").read_text()


# --------------------------------------------------------------------------- near duplicates relative to the data


def near_copy_cache(tmp_path, spread: float, name: str):
    """300 rows of 10 class blobs (64-D, centres ~3 apart per coordinate, rows `spread` around them) and 6 val
    copies of train rows, each moved by a quarter of the distance to its nearest other row."""
    X, y = blobs({c: 30 for c in range(10)}, dim=64, spread=spread, seed=5)
    g = np.random.default_rng(6)
    src = [3, 50, 101, 170, 222, 290]
    D = np.linalg.norm(X[:, None] - X[None], axis=2)
    np.fill_diagonal(D, np.inf)
    copies = []
    for i in src:
        step = g.normal(0, 1, 64)
        copies.append(X[i] + step / np.linalg.norm(step) * 0.25 * D[i].min())
    Xv, yv = np.array(copies, np.float32), y[src]
    ptr = [f"train/c{c}/{i:03d}.jpg" for i, c in enumerate(y)]
    pva = [f"val/c{c}/copy_{i:03d}.jpg" for i, c in zip(src, yv)]
    cache = write_cache(tmp_path / name, {"train": (X, y, ptr), "val": (Xv, yv, pva)},
                        [f"c{c}" for c in range(10)])
    return cache, {(ptr[i], p) for i, p in zip(src, pva)}


@pytest.mark.parametrize("spread,old_rule_pairs", [(1.0, 0), (0.1, 1000)])
def test_near_copies_found_relative_to_the_data_whatever_the_spread(tmp_path, spread, old_rule_pairs):
    """Loose classes (the copies at cosine 0.993-0.997: the old absolute 0.997 finds none) and tight ones
    (distinct rows of a class at cosine > 0.997, as with random-init features: the old rule lists thousands
    of pairs): the rule relative to each image's neighbours lists exactly the planted copies in both."""
    cache, planted = near_copy_cache(tmp_path, spread, "c.h5")
    old = audit(tmp_path, cache, pictures=False, dup_threshold=0.997, max_pairs=10_000)
    assert len(old.duplicates) >= old_rule_pairs and (old_rule_pairs or not planted & {(d["a"], d["b"]) for d in old.duplicates})
    a = audit(tmp_path, cache, pictures=False)
    assert {(d["a"], d["b"]) for d in a.duplicates} == planted
    assert all(d["cross_split"] and d["ratio"] <= 0.45 for d in a.duplicates)
    assert a.thresholds["dup_threshold"] is None and a.thresholds["dup_ratio"] == 0.45
    assert "x each image's median distance to its 2nd-6th nearest images" in (tmp_path / "audit/report.txt").read_text()


def test_dup_threshold_is_an_absolute_cosine_override(tmp_path):
    cache, planted = near_copy_cache(tmp_path, 1.0, "c.h5")
    a = audit(tmp_path, cache, pictures=False, dup_threshold=0.999)  # the copies are at 0.993-0.997
    assert a.duplicates == []
    r = CliRunner().invoke(cli, ["audit", str(cache), "--out", str(tmp_path / "b"), "--dup-threshold", "0.5",
                                 "--no-plots", "--json"])
    assert r.exit_code == 0, r.output
    j = json.loads(r.output)
    assert planted <= {(d["a"], d["b"]) for d in j["duplicates"]}
    assert all(d["similarity"] >= 0.5 for d in j["duplicates"]) and j["thresholds"]["dup_threshold"] == 0.5


# --------------------------------------------------------------------------- photos not worth training on


def small_photo(seed: int, size=(120, 90)) -> Image.Image:
    """A smooth colour picture with fine grain: measured as an ordinary photo (not dark, blurry, ...)."""
    g = np.random.default_rng(seed)
    small = Image.fromarray(g.uniform(0, 255, (8, 8, 3)).astype(np.uint8)).resize(size, Image.BICUBIC)
    arr = np.asarray(small).astype(float) * 0.8 + 25 + g.normal(0, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def problem_photos() -> dict[str, Image.Image]:
    from PIL import ImageFilter

    base = small_photo(100)
    g = np.random.default_rng(0)
    return {
        "dark": Image.fromarray((np.asarray(base) * 0.1).astype(np.uint8)),
        "light": Image.fromarray(np.clip(np.asarray(base) * 0.3 + 200, 0, 255).astype(np.uint8)),
        "blurry": base.filter(ImageFilter.GaussianBlur(6)),
        "low_information": Image.fromarray(np.clip(200 + g.normal(0, 1, (90, 120, 3)), 0, 255).astype(np.uint8)),
        "odd_aspect_ratio": small_photo(101, (240, 40)),
        "odd_size": small_photo(102, (16, 12)),
        "grayscale": base.convert("L").convert("RGB"),
    }


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """24 ordinary train photos, 6 val, and one problem photo of each kind in train; random-init extract."""
    from pipeline.extract import ExtractConfig, extract

    root = tmp_path_factory.mktemp("photos") / "data"
    for split, n in (("train", 12), ("val", 3)):
        for c, cls in enumerate(["ants", "bees"]):
            (root / split / cls).mkdir(parents=True)
            for k in range(n):
                small_photo(1000 * c + 100 * (split == "val") + k).save(root / split / cls / f"{k:02d}.png")
    for kind, img in problem_photos().items():
        img.save(root / "train/ants" / f"problem_{kind}.png")
    cache = root.parent / "p.h5"
    extract(ExtractConfig(data_dir=str(root), cache=str(cache), weights="none", workers=0))
    return root, cache


def test_each_problem_photo_named_by_its_kind_and_no_ordinary_one(photo_folder, tmp_path):
    root, cache = photo_folder
    r = CliRunner().invoke(cli, ["audit", str(cache), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    j = json.loads((tmp_path / "a/audit.json").read_text())
    kinds: dict[str, set] = {}
    for x in j["image_issues"]:
        assert set(x) == {"path", "split", "kind", "score"}
        kinds.setdefault(x["path"], set()).add(x["kind"])
    for kind in problem_photos():
        assert kind in kinds.pop(f"train/ants/problem_{kind}.png"), kind
    assert kinds == {}  # no ordinary photo listed
    assert j["image_checks"]["measured"] == 37 and j["image_checks"]["rows"] == 37
    assert "photos not worth training on: " in r.output and "odd_aspect_ratio" in r.output
    assert "image_issues.png" in j["pictures"] and (tmp_path / "a/image_issues.png").stat().st_size > 1000


def test_cache_without_the_record_gets_a_note(photo_folder, tmp_path):
    import shutil

    import h5py

    root, cache = photo_folder
    old = tmp_path / "old.h5"
    shutil.copy(cache, old)
    with h5py.File(old, "r+") as f:
        for s in ("train", "val"):
            del f[s]["image_stats"]  # as a cache made before extract measured photos
    a = run_audit(AuditConfig(cache=str(old), out=str(tmp_path / "a"), pictures=False))
    assert a.image_issues == [] and a.image_checks == {"measured": 0, "rows": 37}
    assert any(n.startswith("photos not checked") and "re-extract with --force" in n for n in a.notes)


@pytest.mark.parametrize("field,value,why", [("width", -3.0, "width values outside"),
                                             ("entropy", 9.5, "entropy values outside"),
                                             ("height", 10.5, "height that is not a whole number"),
                                             ("blur", np.nan, "partly measured")])
def test_crafted_image_record_is_refused(photo_folder, tmp_path, field, value, why):
    import shutil

    import h5py

    root, cache = photo_folder
    bad = tmp_path / "bad.h5"
    shutil.copy(cache, bad)
    with h5py.File(bad, "r+") as f:
        rec = f["train/image_stats"][...]
        rec[field][2] = value
        f["train/image_stats"][...] = rec
    r = CliRunner().invoke(cli, ["audit", str(bad), "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert f"/train/image_stats {'holds a row that is ' if why == 'partly measured' else 'holds '}" in r.output
    assert why in r.output and "rebuild it with: extract ... --force" in r.output


def test_image_record_layout_checked_before_reading(photo_folder, tmp_path):
    import shutil

    import h5py

    root, cache = photo_folder
    bad = tmp_path / "bad.h5"
    shutil.copy(cache, bad)
    with h5py.File(bad, "r+") as f:
        del f["val/image_stats"]
        f["val/image_stats"] = np.zeros((6, 9), np.float32)  # a plain matrix, not the record
    r = CliRunner().invoke(cli, ["audit", str(bad), "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and "/val/image_stats has shape (6, 9) float32, expected (6,) records" in r.output
