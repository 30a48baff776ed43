"""Issue 28, the living dataset: the cache keys rows by the photo's content, so every change a team makes to
its folder (moves between classes, renames, deletions, additions, new, removed and renamed classes, another
split of a flat folder, rows of another cache) updates the cache without --force, decoding only content no
cache knows, and the updated cache equals a --force rebuild of the folder as it is now."""
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import pipeline.data as data_mod
from cache import CacheMismatch, read_attrs, read_cache
from cli import cli
from pipeline.extract import ExtractConfig, extract, summary_line
from tests.conftest import REPO, make_dataset, write_image

ENV = {**os.environ, "TLEARN_OFFLINE": "1"}


def cfg(data, cache, **kw):
    kw.setdefault("weights", "none")
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    return ExtractConfig(data_dir=str(data), cache=str(cache), **kw)


@pytest.fixture
def decodes(monkeypatch):
    """Counts the photos extract decodes (workers=0: in this process)."""
    seen = []
    real = data_mod.load_rgb

    def counting(path, *a, **k):
        seen.append(str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(data_mod, "load_rgb", counting)
    return seen


def assert_equals_rebuild(cache, data, tmp_path, **kw):
    """The cache equals a --force extract of data as it is now: rows, labels, paths, skipped files, file
    records and split exactly, features and views to float tolerance."""
    fresh = tmp_path / f"rebuild-{len(list(tmp_path.glob('rebuild-*')))}.h5"
    extract(cfg(data, fresh, force=True, **kw))
    a, b = read_cache(cache), read_cache(fresh)
    assert a.class_names == b.class_names and list(a.splits) == list(b.splits)
    for s in b.splits:
        x, y = a.splits[s], b.splits[s]
        assert x.paths == y.paths and x.labels.tolist() == y.labels.tolist(), s
        np.testing.assert_allclose(x.features, y.features, rtol=1e-4, atol=1e-5)
        assert (x.views is None) == (y.views is None)
        if y.views is not None:
            np.testing.assert_allclose(x.views, y.views, rtol=1e-4, atol=1e-5)
    assert a.skipped == b.skipped and a.file_stats == b.file_stats
    assert a.meta.split == b.meta.split and a.meta.files_digest == b.meta.files_digest
    assert a.meta.fingerprint == b.meta.fingerprint


@pytest.fixture
def extracted(tiny_data, tmp_path):
    cache = tmp_path / "f.h5"
    extract(cfg(tiny_data, cache))
    return tiny_data, cache


def update(data, cache, decodes, **kw):
    decodes.clear()
    s = extract(cfg(data, cache, **kw))
    assert not s["up_to_date"] and s["update"] is not None
    return s


def test_move_between_classes_relabels_without_decoding(extracted, tmp_path, decodes):
    data, cache = extracted
    os.rename(data / "train/ants/img_001.jpg", data / "train/bees/from_ants.jpg")
    s = update(data, cache, decodes)
    assert decodes == [] and s["computed"] == 0
    u = s["update"]
    assert (u["reused"], u["new"], u["relabelled"], u["renamed"], u["dropped"], u["hashed"]) == (10, 0, 1, 0, 0, 1)
    assert "| reused 10 | new 0 | relabelled 1 |" in summary_line(s)
    assert_equals_rebuild(cache, data, tmp_path)
    assert extract(cfg(data, cache))["up_to_date"]  # and the next run is a stat pass


def test_rename_and_delete(extracted, tmp_path, decodes):
    data, cache = extracted
    os.rename(data / "train/bees/img_000.jpg", data / "train/bees/zz_renamed.jpg")
    (data / "val/ants/img_001.jpg").unlink()
    s = update(data, cache, decodes)
    assert decodes == [] and (s["update"]["renamed"], s["update"]["dropped"]) == (1, 1)
    assert s["rows"] == {"train": 6, "val": 3}
    assert "renamed 1 | dropped 1" in summary_line(s)
    assert_equals_rebuild(cache, data, tmp_path)


def test_added_files_and_a_new_class_decode_only_the_new_content(extracted, tmp_path, decodes):
    data, cache = extracted
    write_image(data / "train/ants/new.jpg", 0, 500)
    for split, seed in (("train", 501), ("train", 502), ("val", 503)):
        write_image(data / split / "wasps" / f"w{seed}.jpg", 2, seed)
    s = update(data, cache, decodes)
    assert sorted(os.path.basename(p) for p in decodes) == ["new.jpg", "w501.jpg", "w502.jpg", "w503.jpg"]
    assert s["update"]["classes_added"] == ["wasps"] and s["update"]["new"] == 4 and s["update"]["reused"] == 10
    assert "classes +wasps" in summary_line(s)
    assert_equals_rebuild(cache, data, tmp_path)


def test_removed_class_and_renamed_class(tmp_path, decodes):
    data = make_dataset(tmp_path / "data", {"train": {"ants": 2, "bees": 2, "wasps": 2},
                                            "val": {"ants": 1, "bees": 1, "wasps": 1}})
    cache = tmp_path / "f.h5"
    extract(cfg(data, cache))
    for split in ("train", "val"):
        shutil.rmtree(data / split / "ants")  # removed: every other label moves down by one
    s = update(data, cache, decodes)
    assert decodes == [] and s["update"]["classes_removed"] == ["ants"] and s["update"]["dropped"] == 3
    assert read_cache(cache).class_names == ["bees", "wasps"]
    assert_equals_rebuild(cache, data, tmp_path)
    for split in ("train", "val"):
        os.rename(data / split / "bees", data / split / "honeybees")
    s = update(data, cache, decodes)
    u = s["update"]
    assert decodes == [] and (u["classes_added"], u["classes_removed"], u["relabelled"]) == (["honeybees"], ["bees"], 3)
    assert "classes +honeybees -bees" in summary_line(s)
    assert_equals_rebuild(cache, data, tmp_path)


def test_another_split_of_a_flat_folder_decodes_nothing(tmp_path, decodes):
    flat = make_dataset(tmp_path / "flat", {".": {"ants": 8, "bees": 8}})
    cache = tmp_path / "f.h5"
    extract(cfg(flat, cache))
    for kw in ({"split_seed": 5}, {"val_fraction": 0.4, "split_seed": 3},
               {"val_fraction": 0.3, "test_fraction": 0.3, "split_seed": 2}):
        s = update(flat, cache, decodes, **kw)
        assert decodes == [] and s["computed"] == 0 and s["update"]["new"] == 0 and s["update"]["hashed"] == 0
        assert_equals_rebuild(cache, flat, tmp_path, **kw)
        assert read_attrs(cache).split["val_fraction"] == kw.get("val_fraction", 0.2)


def test_reuse_takes_rows_of_another_cache_by_content(extracted, tmp_path, decodes):
    data, cache = extracted
    other = tmp_path / "other"  # a copy on another disk, every file renamed, plus one new photo
    for f in sorted(data.rglob("*.jpg")):
        rel = f.relative_to(data)
        (other / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, other / rel.parent / f"copy_{f.name}")
    write_image(other / "train/bees/fresh.jpg", 1, 900)
    decodes.clear()
    s = extract(cfg(other, tmp_path / "new.h5", reuse=(str(cache),)))
    assert [os.path.basename(p) for p in decodes] == ["fresh.jpg"]
    assert s["update"]["reused"] == 10 and s["update"]["new"] == 1 and "| reused 10 | new 1 |" in summary_line(s)
    assert_equals_rebuild(tmp_path / "new.h5", other, tmp_path)
    # through the CLI, a cache of other settings given to --reuse is refused with its reason
    extract(cfg(data, tmp_path / "seed1.h5", seed=1))
    r = CliRunner().invoke(cli, ["extract", str(other), "--cache", str(tmp_path / "third.h5"), "--weights", "none",
                                 "--workers", "0", "--reuse", str(tmp_path / "seed1.h5")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"--reuse cache {tmp_path / 'seed1.h5'} was made with other settings" in r.output
    assert "drop that --reuse" in r.output and not (tmp_path / "third.h5").exists()
    with pytest.raises(CacheMismatch, match="other settings"):
        extract(cfg(other, tmp_path / "new.h5", reuse=(str(tmp_path / "seed1.h5"),)))


def test_the_same_bytes_under_two_paths_keep_a_row_each(extracted, tmp_path, decodes):
    data, cache = extracted
    shutil.copy(data / "train/ants/img_000.jpg", data / "train/bees/copy_of_ant.jpg")  # labelled differently
    s = update(data, cache, decodes)
    assert decodes == [] and s["rows"] == {"train": 7, "val": 4}
    c = read_cache(cache)
    tr = c.splits["train"]
    i, j = tr.paths.index("train/ants/img_000.jpg"), tr.paths.index("train/bees/copy_of_ant.jpg")
    assert (tr.labels[i], tr.labels[j]) == (0, 1)
    np.testing.assert_array_equal(tr.features[i], tr.features[j])
    assert_equals_rebuild(cache, data, tmp_path)


def test_views_follow_a_photo_and_a_photo_new_to_train_gets_its_views(tiny_data, tmp_path, decodes):
    cache = tmp_path / "f.h5"
    extract(cfg(tiny_data, cache, views=2))
    os.rename(tiny_data / "train/ants/img_000.jpg", tiny_data / "train/bees/moved.jpg")  # keeps its views
    os.rename(tiny_data / "val/bees/img_000.jpg", tiny_data / "train/bees/from_val.jpg")  # needs views: decoded
    s = update(tiny_data, cache, decodes, views=2)
    assert [os.path.basename(p) for p in decodes] == ["from_val.jpg"] and s["update"]["relabelled"] == 1
    assert_equals_rebuild(cache, tiny_data, tmp_path, views=2)
    flat = make_dataset(tmp_path / "flat", {".": {"ants": 8, "bees": 8}})
    extract(cfg(flat, tmp_path / "flat.h5", views=2))
    s = update(flat, tmp_path / "flat.h5", decodes, views=2, split_seed=5)
    before = read_cache(tmp_path / "flat.h5")
    assert len(decodes) == s["update"]["new"] > 0  # only photos new to train, none that train had
    assert_equals_rebuild(tmp_path / "flat.h5", flat, tmp_path, views=2, split_seed=5)
    assert before.splits["train"].views.shape[1] == 2


def test_a_run_trained_on_an_older_view_is_refused_by_audit(tmp_path):
    flat = make_dataset(tmp_path / "flat", {".": {"ants": 8, "bees": 8}})
    cache = tmp_path / "c.h5"
    flags = ["--weights", "none", "--workers", "0"]
    assert CliRunner().invoke(cli, ["extract", str(flat), "--cache", str(cache), *flags]).exit_code == 0
    r = CliRunner().invoke(cli, ["train-head", str(cache), "--out", str(tmp_path / "run"), "--no-plots",
                                 "--epochs", "1"])
    assert r.exit_code == 0, r.output
    val = read_cache(cache).splits["val"].paths[0]
    os.rename(flat / val, flat / ("bees" if val.startswith("ants") else "ants") / "moved.jpg")
    r = CliRunner().invoke(cli, ["extract", str(flat), "--cache", str(cache), *flags])
    assert r.exit_code == 0 and "relabelled 1" in r.output, r.output
    r = CliRunner().invoke(cli, ["audit", str(cache), "--out", str(tmp_path / "a"), "--run", str(tmp_path / "run"),
                                 "--no-plots"])
    assert r.exit_code == 1 and "was trained on another split of the images (other files in its splits)" in r.output


def _cmd(data, cache):
    return [sys.executable, str(REPO / "cli.py"), "extract", str(data), "--cache", str(cache), "--weights", "none",
            "--workers", "0", "--batch-size", "4"]


@pytest.mark.slow
def test_sigkill_during_an_update_keeps_the_old_cache_and_the_rerun_finishes(tmp_path):
    data = make_dataset(tmp_path / "d", {"train": {"ants": 8, "bees": 8}, "val": {"ants": 2, "bees": 2}})
    cache = tmp_path / "f.h5"
    subprocess.run(_cmd(data, cache), env=ENV, check=True, capture_output=True)
    old = read_cache(cache)
    os.rename(data / "train/ants/img_000.jpg", data / "train/bees/moved.jpg")
    for i in range(40):
        write_image(data / "train/ants" / f"new_{i:02d}.jpg", 0, 1000 + i)
    partial = tmp_path / "f.h5.partial"
    proc = subprocess.Popen(_cmd(data, cache), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = __import__("time").time() + 120
    while len(list(partial.glob("*.npz"))) < 6 and proc.poll() is None and __import__("time").time() < deadline:
        __import__("time").sleep(0.01)
    assert proc.poll() is None, "the update ended before the moment to kill it"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    during = read_cache(cache)  # the old cache, valid and unchanged
    assert during.splits["train"].paths == old.splits["train"].paths
    np.testing.assert_array_equal(during.splits["train"].features, old.splits["train"].features)
    r = subprocess.run(_cmd(data, cache), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "updated train 56, val 4" in r.stdout and "resumed:" in r.stdout, r.stdout
    assert not partial.exists()
    assert_equals_rebuild(cache, data, tmp_path)


def test_audit_writes_label_issues_csv_for_a_spreadsheet(tmp_path):
    import csv

    from pipeline.audit import AuditConfig, label_issues_csv, run_audit
    from tests.test_audit import blob_cache

    flips = list(range(0, 120, 12))
    cache, ptr, _ = blob_cache(tmp_path, n_train=120, n_val=30, flips=flips)
    a = run_audit(AuditConfig(cache=str(cache), out=str(tmp_path / "audit"), pictures=False, top=3))
    with open(tmp_path / "audit/label_issues.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "split", "given", "suggested", "score"]
    assert len(rows) == a.scored["above_threshold"] > len(a.label_issues) == 3  # every flagged row, not the top few
    first = a.label_issues[0]
    assert (rows[0]["path"], rows[0]["split"], rows[0]["given"], rows[0]["suggested"], float(rows[0]["score"])) == \
        (first["path"], first["split"], first["label"], first["suggested"], first["score"])
    assert {ptr[i] for i in flips} <= {r["path"] for r in rows}
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    text = label_issues_csv([{"path": "=HYPERLINK(1)/a.jpg", "split": "train", "label": "+a", "suggested": "b",
                              "score": 0.5}]).decode()
    assert text.splitlines()[1] == "'=HYPERLINK(1)/a.jpg,train,'+a,b,0.5"


def test_a_damaged_or_missing_reuse_cache_is_one_line(extracted, tmp_path):
    data, cache = extracted
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file" * 100)
    base = ["extract", str(data), "--cache", str(tmp_path / "n.h5"), "--weights", "none", "--workers", "0"]
    r = CliRunner().invoke(cli, base + ["--reuse", str(tmp_path / "junk.h5")])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"cache {tmp_path / 'junk.h5'} is damaged or not an HDF5 file" in r.output
    r = CliRunner().invoke(cli, base + ["--reuse", str(tmp_path / "absent.h5")])
    assert r.exit_code == 2 and "does not exist" in r.output
    assert not (tmp_path / "n.h5").exists()
    # the cache itself given to --reuse is simply the cache: a rerun is up to date
    r = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(cache), "--weights", "none", "--workers", "0",
                                 "--reuse", str(cache)])
    assert r.exit_code == 0 and "already complete" in r.output, r.output


def test_a_file_changed_during_the_update_is_caught_by_the_next_run(extracted, tmp_path, decodes, monkeypatch):
    import cache.reuse as reuse_mod

    data, cache = extracted
    moved = data / "train/bees/from_ants.jpg"
    os.rename(data / "train/ants/img_001.jpg", moved)
    real = reuse_mod.hash_files

    def hash_then_change(root, paths):
        out = real(root, paths)
        write_image(moved, 1, 4242, size=(40, 30))  # rewritten after it was hashed, before the cache is written
        return out

    monkeypatch.setattr(reuse_mod, "hash_files", hash_then_change)
    s = update(data, cache, decodes)
    assert decodes == [] and s["update"]["relabelled"] == 1  # the bytes it hashed were known
    monkeypatch.setattr(reuse_mod, "hash_files", real)
    s = update(data, cache, decodes)  # the recorded size/mtime are the scan's: the rewrite shows
    assert [os.path.basename(p) for p in decodes] == ["from_ants.jpg"] and s["update"]["changed"] == 1
    assert_equals_rebuild(cache, data, tmp_path)
