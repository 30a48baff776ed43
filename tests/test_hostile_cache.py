"""Crafted, damaged and stale caches; changed files; locks that die with their process; a full disk."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from cache import CacheError, CacheInvalid, CacheLock, CacheMismatch, read_cache
from cli import cli
from pipeline.extract import ExtractConfig, extract
from tests.conftest import REPO, make_dataset, write_image


def cfg(data, cache, **kw):
    kw.setdefault("weights", "none")
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    return ExtractConfig(data_dir=str(data), cache=str(cache), **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One small valid cache (6 train with 2 views, 4 val), copied by each test that crafts a bad one."""
    root = tmp_path_factory.mktemp("base")
    data = make_dataset(root / "data", {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "bees": 2}})
    extract(cfg(data, root / "f.h5", views=2))
    return root / "f.h5"


def crafted(base, tmp_path, edit):
    path = tmp_path / "crafted.h5"
    shutil.copy(base, path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


def replace(f, name, data, **kw):
    del f[name]
    f.create_dataset(name, data=data, **kw)


def refused(path, match):
    with pytest.raises(CacheError, match=match):
        read_cache(path)
    for args in (["info", str(path)], ["train-head", str(path), "--out", str(path.parent / "run"), "--epochs", "1"]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1 and r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
    assert not (path.parent / "run").exists()


# --------------------------------------------------------------------------- changed files (items 3, 4)


def test_a_file_changed_under_the_same_path_is_re_extracted_alone(tiny_data, tmp_path):
    cache = tmp_path / "f.h5"
    extract(cfg(tiny_data, cache))
    target = tiny_data / "train/ants/img_001.jpg"
    write_image(target, 1, 777, size=(50, 40))  # other content, other size
    os.utime(target, ns=(1, 1))  # an old mtime too: only the size tells
    s = extract(cfg(tiny_data, cache))
    assert not s["up_to_date"] and s["computed"] == 1 and s["reused"] == 9 and s["changed"] == 1
    extract(cfg(tiny_data, tmp_path / "fresh.h5"))
    a, b = read_cache(cache), read_cache(tmp_path / "fresh.h5")
    np.testing.assert_allclose(a.splits["train"].features, b.splits["train"].features, atol=1e-5)
    # same size, new mtime, other bytes: the content hash tells
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    s = extract(cfg(tiny_data, cache))
    assert s["changed"] == 1 and s["computed"] == 1
    # touched only (same bytes, new mtime): reused, and recorded so the next run is free
    os.utime(tiny_data / "val/bees/img_000.jpg", ns=(10**18, 10**18))
    s = extract(cfg(tiny_data, cache))
    assert s["computed"] == 0 and s["reused"] == 10
    assert extract(cfg(tiny_data, cache))["up_to_date"]


def test_relabelled_file_and_new_class_update_the_cache_without_force(tiny_data, tmp_path):
    """Issue 28: these were refused ("made from other files", "made for classes"); now the view is updated
    and the known content reused."""
    cache = tmp_path / "f.h5"
    extract(cfg(tiny_data, cache))
    os.rename(tiny_data / "train/ants/img_002.jpg", tiny_data / "train/bees/img_009.jpg")
    s = extract(cfg(tiny_data, cache))
    assert s["computed"] == 0 and s["update"]["relabelled"] == 1 and s["rows"] == {"train": 6, "val": 4}
    c = read_cache(cache)
    assert "train/bees/img_009.jpg" in c.splits["train"].paths and c.splits["train"].labels.tolist() == [0, 0, 1, 1, 1, 1]
    make_dataset(tiny_data, {"train": {"wasps": 1}, "val": {"wasps": 1}})  # the bytes of ants/img_000 (seed 0): known
    s = extract(cfg(tiny_data, cache))
    assert s["computed"] == 0 and s["update"]["classes_added"] == ["wasps"] and s["rows"] == {"train": 7, "val": 5}
    assert read_cache(cache).class_names == ["ants", "bees", "wasps"]


def test_a_skipped_file_repaired_later_is_extracted(tiny_data, tmp_path):
    cache = tmp_path / "f.h5"
    (tiny_data / "train/ants/broken.jpg").write_bytes(b"junk")
    extract(cfg(tiny_data, cache))
    assert read_cache(cache).skipped[0][0] == "train/ants/broken.jpg"
    write_image(tiny_data / "train/ants/img_099.jpg", 0, 5)  # the folder also grew: the reuse path
    s = extract(cfg(tiny_data, cache))
    assert s["computed"] == 1 and s["skipped"] == [["train/ants/broken.jpg", "not a readable image (PIL cannot identify it)"]]
    write_image(tiny_data / "train/ants/broken.jpg", 0, 60)  # repaired (content no cache row has)
    s = extract(cfg(tiny_data, cache))
    assert s["computed"] == 1 and s["skipped"] == [] and s["rows"] == {"train": 8, "val": 4}
    assert "train/ants/broken.jpg" in read_cache(cache).splits["train"].paths


def test_cache_of_an_earlier_version_is_read_and_refused_for_updates(tiny_data, tmp_path):
    cache = tmp_path / "f.h5"
    extract(cfg(tiny_data, cache))
    with h5py.File(cache, "r+") as f:  # what earlier versions wrote: no file stats, another digest
        del f["file_stats"]
        f.attrs["files_digest"] = "0" * 64
    assert read_cache(cache).file_stats is None  # train-head still reads it
    with pytest.raises(CacheMismatch, match="earlier version that did not record file sizes.*pass --force"):
        extract(cfg(tiny_data, cache))


# --------------------------------------------------------------------------- lock (item 8)


def test_lock_dies_with_its_process_even_when_a_forked_child_keeps_the_descriptor(tmp_path):
    cache = tmp_path / "f.h5"
    code = f"""
import os, sys, time
sys.path.insert(0, {str(REPO)!r})
from cache.store import CacheLock
CacheLock({str(cache)!r}).__enter__()
pid = os.fork()  # as a DataLoader worker: inherits every descriptor
if pid == 0:
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
time.sleep(60)
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grandchild = int(child.stdout.readline())
    try:
        with pytest.raises(CacheError, match=f"locked by pid {child.pid}"):
            CacheLock(cache).__enter__()
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert os.path.exists(f"/proc/{grandchild}")  # still holds the descriptor
        t0 = time.perf_counter()
        with CacheLock(cache):
            assert time.perf_counter() - t0 < 1
    finally:
        os.kill(grandchild, signal.SIGKILL)
        child.stdout.close()


def test_lock_refuses_a_second_holder_in_the_same_process(tmp_path):
    with CacheLock(tmp_path / "f.h5"):
        with pytest.raises(CacheError, match="is locked by pid"):
            CacheLock(tmp_path / "f.h5").__enter__()
    with CacheLock(tmp_path / "f.h5"):
        pass


# --------------------------------------------------------------------------- storage outside the file (15)


def test_external_storage_on_a_fifo_is_refused_without_reading(base, tmp_path, monkeypatch):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    monkeypatch.setenv("TLEARN_CACHE_READ_TIMEOUT", "20")

    def edit(f):
        shape = f["val/features"].shape
        del f["val/features"]
        f.create_dataset("val/features", shape, np.float32, external=[(str(fifo), 0, 4 * shape[0] * shape[1])])

    path = crafted(base, tmp_path, edit)
    t0 = time.perf_counter()
    refused(path, "dataset /val/features uses external storage")
    assert time.perf_counter() - t0 < 15


def test_virtual_datasets_and_links_out_of_the_file_are_refused(base, tmp_path):
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as o:
        o["x"] = np.zeros((4, 512), np.float32)

    def virtual(f):
        layout = h5py.VirtualLayout((4, 512), np.float32)
        layout[:] = h5py.VirtualSource(str(other), "x", (4, 512))
        del f["val/features"]
        f["val"].create_virtual_dataset("features", layout)

    refused(crafted(base, tmp_path, virtual), "dataset /val/features is virtual")

    def external_link(f):
        del f["val/labels"]
        f["val/labels"] = h5py.ExternalLink(str(other), "x")

    refused(crafted(base, tmp_path, external_link), "/val/labels is a link to elsewhere")


# --------------------------------------------------------------------------- crafted content (17, 18)


@pytest.mark.parametrize("edit, match", [
    (lambda f: replace(f, "val/paths", np.array(["/etc/hostname"] * 4, dtype=object), dtype=h5py.string_dtype()),
     r"/val/paths holds '/etc/hostname', not a path inside the data folder"),
    (lambda f: replace(f, "val/paths", np.array(["val/../../x.jpg"] * 4, dtype=object), dtype=h5py.string_dtype()),
     r"/val/paths holds 'val/../../x.jpg', not a path inside the data folder"),
    (lambda f: replace(f, "val/labels", np.array([0, 0, 1], np.int64)), r"/val/labels has shape \(3,\) int64 for 4"),
    (lambda f: replace(f, "val/paths", np.array(["a.jpg"], dtype=object), dtype=h5py.string_dtype()),
     r"/val/paths has shape \(1,\) for 4 feature rows"),
    (lambda f: replace(f, "val/labels", np.array([0, 1, 1, -1], np.int64)), r"/val/labels holds -1, outside 0..1"),
    (lambda f: replace(f, "val/labels", np.array([0, 1, 1, 2], np.int64)), r"/val/labels holds 2, outside 0..1"),
    (lambda f: f.attrs.__setitem__("class_names", "[ants"), "attribute class_names is not JSON"),
    (lambda f: f.attrs.__setitem__("class_names", '["ants"]'), r"/train/labels holds 1, outside 0..0 \(1 classes\)"),
    (lambda f: f.attrs.__setitem__("backbone_spec", "nope"), "attribute backbone_spec is not JSON"),
    (lambda f: f.attrs.__delitem__("config"), "attribute config is missing"),
    (lambda f: f.attrs.__delitem__("fingerprint"), "attribute fingerprint is missing or not a sha256"),
    (lambda f: f.attrs.__setitem__("feature_dim", "lots"), "attribute feature_dim is 'lots', not a number"),
    (lambda f: f.attrs.__setitem__("feature_dim", 10**9), "attribute feature_dim is 1000000000, not a number"),
    (lambda f: replace(f, "val/features", np.zeros(4, np.float32)), r"/val/features has shape \(4,\) float32"),
    (lambda f: replace(f, "val/features", np.zeros((4, 7), np.float32)), r"/val/features has shape \(4, 7\)"),
    (lambda f: replace(f, "val/features", np.full((4, 512), np.nan, np.float32)), "/val/features holds non-finite"),
    (lambda f: replace(f, "train/views", np.zeros((6, 512), np.float32)), r"/train/views has shape \(6, 512\)"),
    (lambda f: replace(f, "train/views", np.full((6, 2, 512), np.inf, np.float32)), "/train/views holds non-finite"),
    (lambda f: f.__delitem__("skipped"), "/skipped is missing"),
])
def test_crafted_caches_are_refused_with_what_is_wrong(base, tmp_path, edit, match):
    path = crafted(base, tmp_path, edit)
    refused(path, f"cache {path} is invalid: .*{match}.*rebuild it with: extract ... --force")


def test_a_crafted_cache_is_replaced_only_with_force(base, tmp_path):
    path = crafted(base, tmp_path, lambda f: f.attrs.__setitem__("feature_dim", -3))
    data = base.parent / "data"
    with pytest.raises(CacheInvalid, match="or pass --force to replace it"):
        extract(cfg(data, path, views=2))
    assert extract(cfg(data, path, views=2, force=True))["rows"] == {"train": 6, "val": 4}


# --------------------------------------------------------------------------- full disk (16)


def test_disk_full_while_assembling_removes_the_temp_file_and_the_rerun_finishes(tiny_data, tmp_path, monkeypatch):
    cache = tmp_path / "f.h5"
    real = h5py.Dataset.__setitem__

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    r = CliRunner().invoke(cli, ["extract", str(tiny_data), "--cache", str(cache), "--weights", "none",
                                 "--workers", "0"])
    assert r.exit_code == 1 and r.output == "Error: No space left on device\n", r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "f.h5.partial"]  # no temp file, no lock
    monkeypatch.setattr(h5py.Dataset, "__setitem__", real)
    stale = tmp_path / ".f.h5.tmp-999999"  # as a killed run of an earlier version leaves it
    stale.write_bytes(b"x" * 1000)
    s = extract(cfg(tiny_data, cache))
    assert s["resumed"] == 10 and s["computed"] == 0 and not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "f.h5"]


def test_a_real_write_limit_is_one_line_and_no_crash(tiny_data, tmp_path):
    """RLIMIT_FSIZE makes writes past a size fail as a full disk does (EFBIG): the process must end with
    a message and exit 1, not a segmentation fault, and leave no temp file."""
    import resource

    limit = 40_000

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, str(REPO / "cli.py"), "extract", str(tiny_data), "--cache", str(tmp_path / "f.h5"),
           "--weights", "none", "--workers", "0", "--views", "2"]
    r = subprocess.run(cmd, preexec_fn=small_files, capture_output=True, text=True, env={**os.environ,
                       "TLEARN_OFFLINE": "1"})
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "f.h5.partial"]


# --------------------------------------------------------------------------- names (19), splits and seed (21)


def test_non_utf8_name_is_skipped_escaped_and_the_cache_is_written(tiny_data, tmp_path):
    bad = os.path.join(os.fsencode(tiny_data / "train/ants"), b"bad\xff\xfe.jpg")
    with open(bad, "wb") as f:
        f.write((tiny_data / "train/ants/img_000.jpg").read_bytes())
    write_image(tiny_data / "val/bees/x\x1b[2Jy.jpg", 1, 70)
    (tiny_data / "val/bees/note\n.txt").write_text("x")
    cache = tmp_path / "f.h5"
    r = CliRunner().invoke(cli, ["extract", str(tiny_data), "--cache", str(cache), "--weights", "none",
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "skipped train/ants/bad\\xff\\xfe.jpg: file name is not valid UTF-8 (rename it)" in r.output
    assert "skipped val/bees/note\\n.txt: not an image extension (.txt)" in r.output
    assert "\x1b" not in r.output
    assert read_cache(cache).skipped[0] == ("train/ants/bad\\xff\\xfe.jpg", "file name is not valid UTF-8 (rename it)")
    info = CliRunner().invoke(cli, ["info", str(cache)])
    assert info.exit_code == 0 and "val/bees/note\\n.txt" in info.output and "\x1b" not in info.output


@pytest.mark.parametrize("splits, match", [
    ("train,/abs/val", r"'/abs/val' is not a sub-folder name of DATA_DIR"),
    ("train,../other/val", r"'../other/val' is not a sub-folder name"),
    ("train,skipped", r"a split cannot be called 'skipped'"),
    ("train,val,train", r"'train' is named twice"),
    ("train,.", r"'.' is not a sub-folder name"),
])
def test_bad_split_names_are_one_line_and_write_nothing(tiny_data, tmp_path, splits, match):
    (tmp_path / "other/val").mkdir(parents=True)
    r = CliRunner().invoke(cli, ["extract", str(tiny_data), "--cache", str(tmp_path / "c/f.h5"), "--weights", "none",
                                 "--workers", "0", "--splits", splits])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1
    assert __import__("re").search(match, r.output), r.output
    assert not (tmp_path / "c").exists() and list((tmp_path / "other/val").iterdir()) == []


@pytest.mark.parametrize("seed", [str(2**64), "-1"])
def test_seed_out_of_range_is_one_line(tiny_data, tmp_path, seed):
    r = CliRunner().invoke(cli, ["extract", str(tiny_data), "--cache", str(tmp_path / "f.h5"), "--weights", "none",
                                 "--seed", seed])
    assert r.exit_code == 1 and f"Error: --seed must be from 0 to 4294967295, got {seed}" in r.output


# --------------------------------------------------------------------------- the tool's own files in DATA_DIR


def test_a_cache_inside_the_data_folder_is_never_scanned(tiny_data, interrupt_second_batch):
    cache = tiny_data / "train/ants/feats.h5"  # the worst place: inside a class folder
    with pytest.raises(KeyboardInterrupt):
        extract(cfg(tiny_data, cache))
    interrupt_second_batch()  # the real forward again
    s = extract(cfg(tiny_data, cache))  # the .partial folder sits in train/ants/: not a file, not a class
    assert s["rows"] == {"train": 6, "val": 4} and s["skipped"] == [] and s["resumed"] == 4
    assert extract(cfg(tiny_data, cache))["up_to_date"]  # the cache file itself is not a new file
    cache2 = tiny_data / "train/feats.h5"
    assert extract(cfg(tiny_data, cache2))["rows"] == {"train": 6, "val": 4}


# --------------------------------------------------------------------------- .pt2 contract (20)


class _Net(__import__("torch").nn.Module):
    def __init__(self, width):
        super().__init__()
        import torch

        self.conv = torch.nn.Conv2d(3, 4, 3, stride=8)
        self.width = width

    def forward(self, x):
        import torch

        y = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1)
        return y[:, : self.width]


@pytest.mark.parametrize("width, dynamic, match", [
    (4, False, r"with N=1 it failed .*export it with a dynamic batch dimension"),
    (0, True, r"with N=1 it returned shape \(1, 0\)"),
])
def test_program_contract_is_checked_before_any_work(tiny_data, tmp_path, width, dynamic, match):
    import torch

    torch.manual_seed(0)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic else None
    prog = torch.export.export(_Net(width).eval(), (torch.randn(2, 3, 224, 224),), dynamic_shapes=shapes)
    path = tmp_path / "p.pt2"
    torch.export.save(prog, str(path))
    cache = tmp_path / "out/f.h5"
    r = CliRunner().invoke(cli, ["extract", str(tiny_data), "--cache", str(cache), "--backbone", str(path),
                                 "--workers", "0"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert f"Error: program {path} must map N x 3 x 224 x 224 images to N x D features (D >= 1) for any N" in r.output
    assert __import__("re").search(match, r.output), r.output
    assert not (tmp_path / "out").exists()  # no .partial folder, no lock


def test_a_fifo_at_the_cache_path_is_refused_not_opened(tmp_path):
    fifo = tmp_path / "f.h5"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["info", str(fifo)])
    assert r.exit_code == 1 and r.output == f"Error: cache {fifo} is not a regular file\n"
    assert time.perf_counter() - t0 < 5
