"""Flat folders (DATA_DIR/<class>/*.jpg): the tool's own split, stable per file, the same everywhere."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cache import read_attrs
from cli import cli
from pipeline import PipelineError
from pipeline.data import scan_dataset
from pipeline.splits import LayoutError, SplitSpec, TooFewImagesError, assign, flat_spec, unit_hash
from tests.conftest import write_image


def make_flat(root: Path, classes: dict[str, int], start: int = 0, size=(8, 8)) -> Path:
    """root/<class>/p000.jpg ... (indices start.. start+n-1), tiny images."""
    for ci, (cls, n) in enumerate(sorted(classes.items())):
        for i in range(start, start + n):
            write_image(root / cls / f"p{i:03d}.jpg", ci, 1000 * ci + i, size=size)
    return root


def membership(ds) -> dict[str, str]:
    return {p: s for s, sp in ds.splits.items() for p in sp.paths}


def test_flat_folder_is_split_per_class_by_the_file_hash(tmp_path):
    root = make_flat(tmp_path / "d", {"ants": 30, "bees": 20})
    (root / "ants" / "notes.txt").write_text("x")
    ds = scan_dataset(root, ["train", "val"])
    assert ds.class_names == ["ants", "bees"] and list(ds.splits) == ["train", "val"]
    assert ds.split == SplitSpec("flat", 0.2, 0.0, 0)
    # each file's split is the documented function of (relative path, seed): u < 0.2 -> val
    for path, split in membership(ds).items():
        assert split == ("val" if unit_hash(path, 0) < 0.2 else "train")
    assert sum(len(sp) for sp in ds.splits.values()) == 50
    counts = {s: [sp.labels.count(0), sp.labels.count(1)] for s, sp in ds.splits.items()}
    assert counts == {"train": [24, 16], "val": [6, 4]}  # ants 30 -> 6 val, bees 20 -> 4 val
    assert [p for sp in ds.splits.values() for p, _ in sp.skipped] == ["ants/notes.txt"]
    assert ds.splits["val"].paths == sorted(ds.splits["val"].paths)  # deterministic, sorted order
    assert scan_dataset(root, ["train", "val"]).split_record() == ds.split_record()
    other = scan_dataset(root, ["train", "val"], split_seed=1)
    assert other.split_record()["digest"] != ds.split_record()["digest"]


def test_class_balance_follows_the_fraction(tmp_path):
    """Per class, the val count is Binomial(n, f) (the price of per-file stability, see splits.py): over
    20 classes x 400 files every class stays within 3 sd of f * n and the pooled share within 0.01."""
    f, n = 0.2, 400
    shares = []
    for c in range(20):
        val = sum(assign(f"class{c}/IMG_{i:05d}.jpg", SplitSpec("flat", f, 0.0, 0)) == "val" for i in range(n))
        assert abs(val - f * n) <= 3 * math.sqrt(n * f * (1 - f)), (c, val)
        shares.append(val / n)
    assert abs(np.mean(shares) - f) < 0.01
    # a test fraction takes its band from train only: val is the same with or without it
    spec_t = SplitSpec("flat", f, 0.1, 0)
    paths = [f"a/{i}.jpg" for i in range(2000)]
    with_test = [assign(p, spec_t) for p in paths]
    without = [assign(p, SplitSpec("flat", f, 0.0, 0)) for p in paths]
    assert [s == "val" for s in with_test] == [s == "val" for s in without]
    assert abs(with_test.count("test") / 2000 - 0.1) < 0.02


def test_adding_files_keeps_every_old_files_split(tmp_path):
    root = make_flat(tmp_path / "d", {"ants": 25, "bees": 25})
    before = membership(scan_dataset(root, ["train", "val"]))
    make_flat(root, {"ants": 40, "bees": 15}, start=25)  # 55 new photos
    write_image(root / "bees" / "zz_new" / "deeper.jpg", 1, 5)
    after = membership(scan_dataset(root, ["train", "val"]))
    assert len(after) == len(before) + 56
    assert all(after[p] == s for p, s in before.items())
    # the new files still get their share: 16 of 56 here, 0.2 expected
    assert sum(after[p] == "val" for p in after if p not in before) == 16


def test_folder_with_both_layouts_is_refused(tmp_path):
    root = make_flat(tmp_path / "d", {"train/ants": 2, "val/ants": 2, "cats": 3})
    (root / "docs").mkdir()
    (root / "docs" / "readme.txt").write_text("not a class: no images")
    with pytest.raises(LayoutError) as e:
        scan_dataset(root, ["train", "val"])
    assert str(e.value).startswith(f"{root} mixes two layouts: split folders (train/, val/) and class folders "
                                   "beside them (cats/); use one:")
    (root / "cats" / "p000.jpg").rename(root / "docs" / "p000.jpg")
    with pytest.raises(LayoutError, match=r"class folders beside them \(cats/, docs/\)"):
        scan_dataset(root, ["train", "val"])


def test_fractions_on_a_folder_with_its_own_split_are_refused(tiny_data):
    with pytest.raises(LayoutError) as e:
        scan_dataset(tiny_data, ["train", "val"], val_fraction=0.3)
    assert str(e.value) == (f"{tiny_data} has its own split folders (train/, val/), so --val-fraction/--test-fraction/"
                            "--split-seed do not apply; drop them, or point at a folder of class folders")
    with pytest.raises(LayoutError):
        scan_dataset(tiny_data, ["train", "val"], split_seed=3)
    assert scan_dataset(tiny_data, ["train", "val"]).split == SplitSpec("folders")


@pytest.mark.parametrize("val, test, message", [
    (1.0, None, "--val-fraction must be between 0 and 1"),
    (0.0, None, "--val-fraction must be between 0 and 1"),
    (0.6, 0.4, "leave nothing to train on"),
])
def test_bad_fractions(val, test, message):
    with pytest.raises(PipelineError, match=message):
        flat_spec(val, test, 0)


def test_class_with_too_few_images_names_the_class_and_count(tmp_path):
    root = make_flat(tmp_path / "d", {"ants": 30, "bees": 1})
    with pytest.raises(TooFewImagesError) as e:
        scan_dataset(root, ["train", "val"])
    assert str(e.value) == ("class 'bees' has 1 image: too few to split into train and val (each needs at least one); "
                            "add images to it or give the folder train/ and val/ folders")
    with pytest.raises(TooFewImagesError, match="'bees' has 1 image: too few to split into train and val and test"):
        scan_dataset(root, ["train", "val"], test_fraction=0.1)
    # 3 images, none of them hashing into val with seed 0: said, with what to do
    names = [n for n in (f"q{i}.jpg" for i in range(50)) if unit_hash(f"bees/{n}", 0) >= 0.2][:3]
    (root / "bees" / "p000.jpg").unlink()
    for i, name in enumerate(names):
        write_image(root / "bees" / name, 1, i, size=(8, 8))
    with pytest.raises(TooFewImagesError) as e:
        scan_dataset(root, ["train", "val"])
    assert str(e.value) == ("class 'bees' has 3 images and none of them falls into val with split seed 0 "
                            "(0.2 of 3 = 0.6 expected); add images to it, or pick another --split-seed")


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_extract_train_head_and_finetune_use_the_same_recorded_split(tmp_path):
    root = make_flat(tmp_path / "d", {"ants": 4, "bees": 4}, size=(40, 32))
    flags = ["--val-fraction", "0.3", "--split-seed", "2", "--weights", "none", "--workers", "0"]
    cache = tmp_path / "c.h5"
    r = invoke("extract", root, "--cache", cache, *flags)
    assert r.exit_code == 0, r.output
    ds = scan_dataset(root, ["train", "val"], val_fraction=0.3, split_seed=2)
    from cache import read_cache

    c = read_cache(cache)
    assert {s: c.splits[s].paths for s in c.splits} == {s: sp.paths for s, sp in ds.splits.items()}
    record = json.loads(c.attrs["split"])
    assert record == {"layout": "flat", "val_fraction": 0.3, "test_fraction": 0.0, "seed": 2,
                      "digest": ds.split_record()["digest"]}
    r = invoke("info", cache)
    assert "split: flat class folders, per-file hash (val 0.3, split seed 2; stable as the folder grows)" in r.output
    r = invoke("train-head", cache, "--out", tmp_path / "head", "--epochs", 2, "--no-plots", "--lr", "0.001,0.01")
    assert r.exit_code == 0, r.output
    head = json.loads((tmp_path / "head/metrics.json").read_text())
    assert head["split"] == record
    n_val = len(ds.splits["val"])
    ci = head["accuracy_ci"]["val"]
    assert ci["n"] == n_val and ci["correct"] == round(head["accuracy"]["val"] * n_val)
    assert head["best_val_acc_ci"]["n"] == n_val and all(row["best_val_ci"]["n"] == n_val for row in head["sweep"])
    assert f"95% CI {ci['low']:.3f}-{ci['high']:.3f}, {ci['correct']}/{n_val})" in r.output  # the printed report
    assert "best_val_acc  95% CI       correct" in r.output  # the sweep table
    r = invoke("finetune", root, "--out", tmp_path / "ft", "--epochs", 1, "--no-plots", *flags)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "ft/metrics.json").read_text())
    assert m["split"] == record and m["n"] == {"train": len(ds.splits["train"]), "val": len(ds.splits["val"])}
    assert m["accuracy_ci"]["val"]["n"] == n_val and m["best_val_acc_ci"]["n"] == n_val
    assert "95% CI" in (tmp_path / "ft/report.txt").read_text()
    import torch

    assert torch.load(tmp_path / "ft/model.pt", weights_only=True)["split"] == record
    # the same cache with other split flags: updated to the new split, the rows reused (issue 28)
    r = CliRunner().invoke(cli, ["extract", str(root), "--cache", str(cache), "--weights", "none", "--workers", "0"])
    assert r.exit_code == 0 and "| new 0 |" in r.output and "moved split" in r.output, r.output
    assert read_attrs(cache).split["val_fraction"] == 0.2


def test_grown_flat_folder_reuses_the_cache(tmp_path):
    root = make_flat(tmp_path / "d", {"ants": 6, "bees": 6})
    flags = ["--weights", "none", "--workers", "0"]
    cache = tmp_path / "c.h5"
    assert invoke("extract", root, "--cache", cache, *flags).exit_code == 0
    make_flat(root, {"ants": 2}, start=6)
    r = invoke("extract", root, "--cache", cache, *flags)
    assert r.exit_code == 0, r.output
    assert "| reused 12 | new 2 |" in r.output


def test_splits_flag_on_a_flat_folder_is_a_usage_error(tmp_path, tiny_data):
    """A flat folder is split by the tool: --splits was ignored by extract (no test split from train,val,test;
    foo,bar accepted) and used by finetune (val,train trained on val). Refused, as --val-fraction is refused
    for split folders; both are usage errors (exit 2) before any work."""
    root = make_flat(tmp_path / "d", {"ants": 4, "bees": 4})
    line = (f"Error: {root} holds class folders only (no train/ or val/ folders), so --splits does not apply: the "
            "tool splits it (see --val-fraction); drop --splits, or give the folder its own train/ and val/ folders")
    flags = ["--weights", "none", "--workers", "0"]
    for cmd in (["extract", root, "--cache", tmp_path / "c.h5"], ["finetune", root, "--out", tmp_path / "ft"],
                ["run", root, "--out", tmp_path / "run"]):
        for splits in ("train,val,test", "foo,bar", "val,train"):
            r = CliRunner().invoke(cli, [str(a) for a in cmd] + ["--splits", splits, *flags])
            assert r.exit_code == 2 and r.output.strip().splitlines()[-1] == line, (cmd, splits, r.output)
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "ft/checkpoint.pt").exists()
    assert not (tmp_path / "run/features.h5").exists()
    with pytest.raises(LayoutError):
        scan_dataset(root, ["val", "train"])
    assert list(scan_dataset(root, ["train", "val"]).splits) == ["train", "val"]  # the default's own names
    r = CliRunner().invoke(cli, ["extract", str(tiny_data), "--cache", str(tmp_path / "t.h5"), "--val-fraction", "0.3",
                                 *flags])
    assert r.exit_code == 2 and "so --val-fraction/--test-fraction/--split-seed do not apply" in r.output


def test_a_fraction_that_leaves_a_split_empty_is_blamed_not_the_seed(tmp_path):
    root = make_flat(tmp_path / "d", {"ants": 30, "bees": 20})
    with pytest.raises(TooFewImagesError) as e:
        scan_dataset(root, ["train", "val"], val_fraction=0.999)
    assert str(e.value) == ("class 'ants' has 30 images and --val-fraction 0.999 leaves too few of them for train "
                            "(0.001 of 30 = 0.03 expected); lower --val-fraction, or add images to it")
    with pytest.raises(TooFewImagesError) as e:
        scan_dataset(root, ["train", "val"], val_fraction=0.001)
    assert str(e.value) == ("class 'ants' has 30 images and --val-fraction 0.001 gives too few of them for val "
                            "(0.001 of 30 = 0.03 expected); raise --val-fraction, or add images to it")
    with pytest.raises(TooFewImagesError, match="--val-fraction 0.5 and --test-fraction 0.499 leave too few of them "
                                                "for train .*; lower --val-fraction or --test-fraction, or add"):
        scan_dataset(root, ["train", "val"], val_fraction=0.5, test_fraction=0.499)
    r = CliRunner().invoke(cli, ["extract", str(root), "--cache", str(tmp_path / "c.h5"), "--val-fraction", "0.999"])
    assert r.exit_code == 1 and "split seed" not in r.output and "--val-fraction 0.999 leaves too few" in r.output


@pytest.mark.parametrize("flag, value", [("--val-fraction", "nan"), ("--val-fraction", "inf"),
                                         ("--test-fraction", "nan"), ("--test-fraction", "-inf"),
                                         ("--max-skipped", "nan")])
def test_non_finite_fractions_are_usage_errors(tmp_path, flag, value):
    root = make_flat(tmp_path / "d", {"ants": 4, "bees": 4})
    for cmd in (["extract", root, "--cache", tmp_path / "c.h5"], ["finetune", root, "--out", tmp_path / "ft"]):
        r = CliRunner().invoke(cli, [str(a) for a in cmd] + [flag, value, "--weights", "none"])
        assert r.exit_code == 2 and f"Invalid value for '{flag}'" in r.output, r.output
    assert not (tmp_path / "c.h5").exists() and not (tmp_path / "ft").exists()


def test_preview_of_a_flat_folder_needs_no_val_split(tmp_path):
    """preview draws training pictures: a flat folder whose class is too small to split (or falls into val
    with the default seed) still gets its grid, from all its images."""
    root = make_flat(tmp_path / "d", {"ants": 5, "bees": 1}, size=(40, 32))
    r = CliRunner().invoke(cli, ["preview", str(root), "--out", str(tmp_path / "p.png"), "-n", "6"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"wrote {tmp_path / 'p.png'} (6 images)"
    from pipeline.preview import preview

    assert sorted(preview(str(root), str(tmp_path / "q.png"), n=6)["classes"]) == ["ants"] * 5 + ["bees"]
