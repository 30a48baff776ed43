"""torchrun on the CPU (gloo): sharded extraction equals one process; DDP finetune writes one run folder."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import read_cache
from tests.conftest import REPO, make_dataset

ENV = {**os.environ, "TLEARN_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def torchrun(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(REPO / "cli.py"), *map(str, args)]


def single(*args):
    return [sys.executable, str(REPO / "cli.py"), *map(str, args)]


def worker_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with RANK=rank."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            if f"RANK={rank}".encode() in (p / "environ").read_bytes().split(b"\0"):
                return int(p.name)
        except (OSError, ValueError, IndexError):
            continue
    return None


@pytest.fixture
def data(tmp_path):
    root = make_dataset(tmp_path / "d", {"train": {"ants": 9, "bees": 8}, "val": {"ants": 3, "bees": 4}})
    (root / "train/ants/zz_broken.jpg").write_text("not an image")
    (root / "val/bees/notes.txt").write_text("x")
    return root


def extract_args(data, cache):
    return ["extract", data, "--cache", cache, "--weights", "none", "--workers", "0", "--batch-size", "4"]


def assert_same_cache(a_path, b_path):
    a, b = read_cache(a_path), read_cache(b_path)
    assert list(a.splits) == list(b.splits)
    for s in a.splits:
        # two processes batch the rows differently (a short last batch per rank) and run other thread counts:
        # other kernel paths, equal to float rounding only
        np.testing.assert_allclose(a.splits[s].features, b.splits[s].features, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a.splits[s].labels, b.splits[s].labels)
        assert a.splits[s].paths == b.splits[s].paths
    assert a.skipped == b.skipped and a.attrs["fingerprint"] == b.attrs["fingerprint"]
    assert a.attrs["files_digest"] == b.attrs["files_digest"]


@pytest.mark.slow
def test_torchrun_extract_equals_single_process(data, tmp_path):
    r = subprocess.run(torchrun(*extract_args(data, tmp_path / "two.h5")), env=ENV, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[:2000] + " ... " + r.stderr[-2000:]
    assert r.stdout.count("extracted train 17, val 7 | skipped 2 |") == 1  # only rank 0 prints the summary
    assert not list(tmp_path.glob("two.h5.*"))  # shards merged and removed, lock released
    subprocess.run(single(*extract_args(data, tmp_path / "one.h5")), env=ENV, check=True, capture_output=True)
    assert_same_cache(tmp_path / "two.h5", tmp_path / "one.h5")
    # train-head stays single-process and reads the cache the two ranks made
    r = subprocess.run(single("train-head", tmp_path / "two.h5", "--out", tmp_path / "run", "--epochs", 2,
                              "--no-plots"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "run/metrics.json").read_text())["n"] == {"train": 17, "val": 7}


@pytest.mark.slow
def test_rank_dying_mid_extract_leaves_nothing_complete_and_rerun_finishes(tmp_path):
    big = make_dataset(tmp_path / "big", {"train": {"ants": 40, "bees": 40}, "val": {"ants": 4, "bees": 4}})
    cache = tmp_path / "f.h5"
    proc = subprocess.Popen(torchrun(*extract_args(big, cache)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    pid = None
    while time.time() < deadline and proc.poll() is None:
        pid = worker_pid(proc.pid, 1)
        if pid and len(list((tmp_path / "f.h5.partial").glob("*.npz"))) >= 2:
            break
        time.sleep(0.02)
    assert pid, "no rank 1 worker found while the job ran"
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    assert not cache.exists()
    r = subprocess.run(torchrun(*extract_args(big, cache)), env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[:2000] + " ... " + r.stderr[-2000:]
    assert "resumed:" in r.stdout
    subprocess.run(single(*extract_args(big, tmp_path / "one.h5")), env=ENV, check=True, capture_output=True)
    assert_same_cache(cache, tmp_path / "one.h5")


@pytest.mark.slow
def test_ddp_finetune_writes_the_run_folder_once_and_resumes(data, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", data, "--out", out, "--weights", "none", "--workers", "0", "--epochs", 2, "--no-plots"]
    proc = subprocess.Popen(torchrun(*args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    pid = worker_pid(proc.pid, 0)
    assert pid and (out / "checkpoint.pt").exists()
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=120)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert not (out / "metrics.json").exists()
    r = subprocess.run(torchrun(*args, "--resume"), env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[:2000] + " ... " + r.stderr[-2000:]
    assert r.stdout.count("trained 2 epochs") == 1 and r.stdout.count("== val: 7 images") == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2 and len(m["history"]) == 2 and m["n"] == {"train": 17, "val": 7}
    assert sum(map(sum, m["confusion_matrix"]["val"])) == 7
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.json", "model.pt", "report.txt",
                                                     "verdicts.json"]
