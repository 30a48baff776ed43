"""Killed runs lose nothing and leave nothing that passes as complete; damaged files are reported."""
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

from click.testing import CliRunner

from cache import CacheError, read_attrs, read_cache
from cli import cli
from pipeline.runfolder import RunManifest, load_manifest, save_run
from tests.conftest import REPO, make_dataset

ENV = {**os.environ, "TLEARN_OFFLINE": "1"}


def comparable(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def extract_cmd(data, cache, *extra):
    return [sys.executable, str(REPO / "cli.py"), "extract", str(data), "--cache", str(cache), "--weights", "none",
            "--workers", "0", "--batch-size", "4", *extra]


def wait_for(cond, proc, timeout=120):
    deadline = time.time() + timeout
    while not cond() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert cond(), "the run ended before the moment to kill it"


@pytest.fixture
def data72(tmp_path):
    return make_dataset(tmp_path / "d", {"train": {"ants": 32, "bees": 32}, "val": {"ants": 4, "bees": 4}})


@pytest.mark.slow
def test_sigkill_mid_extract_then_resume_equals_clean_run(data72, tmp_path):
    cache = tmp_path / "f.h5"
    partial = tmp_path / "f.h5.partial"
    proc = subprocess.Popen(extract_cmd(data72, cache), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(list(partial.glob("*.npz"))) >= 3, proc)
    # a second extract into the same cache while the first runs: refused, first unharmed
    second = CliRunner().invoke(cli, extract_cmd(data72, cache)[2:])
    assert proc.poll() is None, "the first extract must still be running"
    assert second.exit_code == 1
    assert f"Error: cache {cache} is locked by pid {proc.pid}" in second.output
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not cache.exists()  # nothing at the cache path looks complete
    with pytest.raises(CacheError, match="unfinished: rerun the same extract command to resume it"):
        read_cache(cache)
    done = 4 * len(list(partial.glob("*.npz")))
    assert 12 <= done < 72
    r = subprocess.run(extract_cmd(data72, cache), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"(resumed: {done} images were already done)" in r.stdout
    assert not partial.exists() and not (tmp_path / "f.h5.lock").exists()
    clean = tmp_path / "clean.h5"
    subprocess.run(extract_cmd(data72, clean), env=ENV, check=True, capture_output=True)
    a, b = read_cache(cache), read_cache(clean)
    for split in ("train", "val"):
        np.testing.assert_array_equal(a.splits[split].features, b.splits[split].features)
        np.testing.assert_array_equal(a.splits[split].labels, b.splits[split].labels)
        assert a.splits[split].paths == b.splits[split].paths
    assert a.attrs["fingerprint"] == b.attrs["fingerprint"]


def test_readers_get_the_last_complete_cache_during_a_rebuild(data72, tmp_path):
    cache = tmp_path / "f.h5"
    subprocess.run(extract_cmd(data72, cache), env=ENV, check=True, capture_output=True)
    old_fp = read_attrs(cache).fingerprint
    proc = subprocess.Popen(extract_cmd(data72, cache, "--seed", "1", "--force"), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(list((tmp_path / "f.h5.partial").glob("*.npz"))) >= 2, proc)
    during = read_cache(cache)  # served from the complete old file, never the partial one
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert during.attrs["fingerprint"] == old_fp and len(during.splits["train"].paths) == 64
    assert read_attrs(cache).fingerprint == old_fp


def test_flipped_byte_is_reported_not_read(tiny_data, tmp_path):
    from pipeline.extract import ExtractConfig, extract

    cache = tmp_path / "f.h5"
    extract(ExtractConfig(str(tiny_data), str(cache), weights="none", workers=0))
    with h5py.File(cache, "r") as f:
        offset = f["train/features"].id.get_chunk_info(0).byte_offset
    with open(cache, "r+b") as fh:
        fh.seek(offset + 100)
        byte = fh.read(1)
        fh.seek(offset + 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CacheError, match=rf"cache {cache} is damaged .*rebuild it with: extract \.\.\. --force"):
        read_cache(cache)
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 3])  # a truncated file
    with pytest.raises(CacheError, match="is damaged or not an HDF5 file"):
        read_cache(cache)


def head_manifest(weight):
    return RunManifest(kind="head", class_names=["a", "b"], state_dict={"weight": weight, "bias": torch.zeros(2)},
                       recipe={}, features={"backbone": {"kind": "torchvision"}})


def test_kill_during_save_keeps_previous_model(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_run(out, head_manifest(torch.ones(2, 3)), {"v": 1, "kind": "head"}, "first")

    def dies(*a):
        raise KeyboardInterrupt  # as if killed between the temp write and the rename

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(KeyboardInterrupt):
        save_run(out, head_manifest(torch.zeros(2, 3)), {"v": 2, "kind": "head"}, "second")
    monkeypatch.undo()
    assert torch.equal(load_manifest(out).state_dict["weight"], torch.ones(2, 3))
    kept = json.loads((out / "metrics.json").read_text())
    assert {k: v for k, v in kept.items() if k != "files"} == {"v": 1, "kind": "head"}  # "files": what the run wrote
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt", "report.txt"]


def _finetune_cmd(data, out, *extra):
    return [sys.executable, str(REPO / "cli.py"), "finetune", str(data), "--out", str(out), "--weights", "none",
            "--epochs", "3", "--workers", "0", "--no-plots", *extra]


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted(tiny_data, tmp_path):
    env = {**os.environ, "TLEARN_OFFLINE": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_finetune_cmd(tiny_data, whole), check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_finetune_cmd(tiny_data, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ck = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] < 2 and not (killed / "metrics.json").exists()  # really interrupted mid-run
    r = subprocess.run(_finetune_cmd(tiny_data, killed, "--resume"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming {killed} after epoch {ck['epoch']}" in r.stderr
    a = json.loads((whole / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert comparable(a["history"]) == comparable(b["history"])
    assert (a["best_val_acc"], a["best_epoch"]) == (b["best_val_acc"], b["best_epoch"])
    sa = torch.load(whole / "model.pt", weights_only=True)["state_dict"]
    sb = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)




def test_reading_a_cache_is_time_bounded(tiny_data, tmp_path, monkeypatch):
    """A read that does not finish (as HDF5 can on a damaged file) becomes an error, not a hang."""
    import cache.store as store
    from pipeline.extract import ExtractConfig, extract

    cache = tmp_path / "f.h5"
    extract(ExtractConfig(str(tiny_data), str(cache), weights="none", workers=0))
    real = store._read_cache
    monkeypatch.setattr(store, "_read_cache", lambda *a: time.sleep(30) or real(*a))
    monkeypatch.setenv("TLEARN_CACHE_READ_TIMEOUT", "0.5")
    t0 = time.perf_counter()
    with pytest.raises(CacheError, match=r"took longer than 0.5 s; it is probably damaged"):
        read_cache(cache)
    assert time.perf_counter() - t0 < 5
    monkeypatch.setattr(store, "_read_cache", real)
    assert read_cache(cache).splits["train"].features.shape == (6, 512)
