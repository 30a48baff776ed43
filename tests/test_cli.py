import json
import os
import subprocess
import sys

import h5py
import torch
from click.testing import CliRunner

from cli import cli
from tests.conftest import REPO


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_extract_train_head_report(tiny_data, tmp_path):
    cache, out = tmp_path / "f.h5", tmp_path / "run"
    r = invoke("extract", tiny_data, "--cache", cache, "--weights", "none", "--workers", 0)
    assert r.exit_code == 0, r.output
    assert "extracted train 6, val 4 | skipped 0 |" in r.output and "images/s" in r.output
    r = invoke("train-head", cache, "--out", out, "--epochs", 3)
    assert r.exit_code == 0, r.output
    assert "precision    recall  f1-score   support" in r.output and "trained in" in r.output
    for name in ("model.pt", "metrics.json", "report.txt", "curves.png", "confusion.png", "predictions.png"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert {"best_val_acc", "best_epoch", "history", "classification_report", "confusion_matrix", "class_names",
            "seconds"} <= set(m)
    assert len(m["history"]) == 3 and m["class_names"] == ["ants", "bees"]
    assert m["classification_report"]["val"]["ants"]["support"] == 2
    assert sum(map(sum, m["confusion_matrix"]["val"])) == 4
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["kind"] == "head" and model["state_dict"]["weight"].shape == (2, 512)
    assert model["features"]["backbone"]["backbone"] == "resnet18" and model["class_names"] == ["ants", "bees"]
    assert model["format"] == "tlearn-run/2" and model["features"]["feature_dim"] == 512
    r = invoke("report", out)
    assert r.exit_code == 0 and r.output == (out / "report.txt").read_text().rstrip("\n") + "\n"
    r = invoke("info", cache)
    assert r.exit_code == 0, r.output
    assert "backbone resnet18  weights none  precision fp32  feature_dim 512  views 0" in r.output
    assert "  train: 6 rows (ants 3, bees 3)" in r.output and "  val: 4 rows (ants 2, bees 2)" in r.output
    assert "skipped 0" in r.output


def test_run_one_command_and_sweep(tiny_data, tmp_path):
    out = tmp_path / "run"
    r = invoke("run", tiny_data, "--out", out, "--weights", "none", "--workers", 0, "--epochs", 2,
               "--lr", "0.001,0.01", "--no-plots")
    assert r.exit_code == 0, r.output
    assert (out / "features.h5").is_file() and (out / "model.pt").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert [row["lr"] for row in m["sweep"]] == [0.001, 0.01]
    assert "<- best" in r.output
    assert m["best_val_acc"] == max(row["best_val_acc"] for row in m["sweep"])


def test_views_are_used_by_train_head_unless_told_not_to(tiny_data, tmp_path):
    cache = tmp_path / "v.h5"
    assert invoke("extract", tiny_data, "--cache", cache, "--weights", "none", "--workers", 0, "--views", 2).exit_code == 0
    runs = {}
    for name, extra in (("with", []), ("without", ["--no-views"])):
        r = invoke("train-head", cache, "--out", tmp_path / name, "--epochs", 3, "--no-plots", *extra)
        assert r.exit_code == 0, r.output
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert runs["with"]["views_used"] is True and runs["without"]["views_used"] is False
    assert runs["with"]["history"][0]["train_loss"] != runs["without"]["history"][0]["train_loss"]


def test_errors_are_one_line(tiny_data, tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not hdf5")
    r = invoke("train-head", junk, "--out", tmp_path / "o")
    assert r.exit_code == 1 and r.output.startswith("Error: cache ") and "is damaged or not an HDF5 file" in r.output
    assert len(r.output.strip().splitlines()) == 1
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.attrs["format"] = "something-else"
    r = invoke("train-head", tmp_path / "other.h5", "--out", tmp_path / "o")
    assert r.exit_code == 1 and "is not a feature cache of this tool" in r.output
    r = invoke("train-head", tmp_path / "other.h5", "--out", tmp_path / "o", "--lr", "fast")
    assert r.exit_code == 2 and "'fast' is not a float" in r.output
    r = invoke("report", tmp_path)
    assert r.exit_code == 1 and "has no report.txt" in r.output
    r = invoke("extract", tiny_data, "--cache", tmp_path / "x.h5", "--weights", "imagenet")
    assert r.exit_code == 1 and "resnet18-f37072fd.pth" in r.output and "--weights none" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_os_errors_are_one_line(tiny_data, tmp_path):
    (tmp_path / "file").write_text("x")
    r = invoke("extract", tiny_data, "--cache", tmp_path / "file" / "f.h5", "--weights", "none", "--workers", 0)
    assert r.exit_code == 1 and r.output.startswith(f"Error: File exists: {tmp_path / 'file'}")
    assert len(r.output.strip().splitlines()) == 1


def test_incomplete_cache_refused(tiny_data, tmp_path):
    cache = tmp_path / "f.h5"
    invoke("extract", tiny_data, "--cache", cache, "--weights", "none", "--workers", 0)
    with h5py.File(cache, "a") as f:
        f.attrs["complete"] = False
    r = invoke("train-head", cache, "--out", tmp_path / "o")
    assert r.exit_code == 1 and "is incomplete; rerun the extract command" in r.output


def _run_into_closed_pipe(*args) -> subprocess.CompletedProcess:
    """python cli.py ARGS with stdout a pipe whose reader is already gone (`... | head -0`)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`info F.h5 | head -1` printed 'Error: Broken pipe'; now every printing command ends as click does for
    its own help: no message, status 1."""
    import numpy as np

    from tests.synthetic_cache import write_cache

    cache = write_cache(tmp_path / "c.h5", {"train": (np.ones((2, 4)), [0, 1], ["a.jpg", "b.jpg"])}, ["a", "b"])
    for args in (["info", cache], ["--help"], ["--version"]):
        r = _run_into_closed_pipe(*args)
        assert r.returncode == 1 and r.stderr == "", (args, r.stderr)


def test_version_and_examples_name_the_program_as_run(monkeypatch):
    from cli import program_name, tool_version

    version = tool_version()
    assert version.count(".") >= 1 and version[0].isdigit()
    r = CliRunner().invoke(cli, ["--version"], prog_name="tlearn")
    assert r.exit_code == 0 and r.output == f"tlearn {version}\n"
    r = CliRunner().invoke(cli, ["extract", "--help"], prog_name="tlearn")
    assert "Usage: tlearn extract" in r.output and "Example: tlearn extract data/hymenoptera_data" in r.output
    assert "cli.py" not in r.output
    r = CliRunner().invoke(cli, ["run", "--help"], prog_name="python cli.py")
    assert "Example: python cli.py run photos/" in r.output.replace("\n", " ").replace("  ", " ")
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/tlearn", "info"])
    assert program_name() == "tlearn"
    monkeypatch.setattr(sys, "argv", ["cli.py", "info"])
    assert program_name() == "python cli.py"
    r = subprocess.run([sys.executable, "cli.py", "--version"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == f"tlearn {version}\n"


def test_version_falls_back_to_pyproject(monkeypatch):
    import importlib.metadata
    import tomllib

    import cli as cli_module

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    want = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert cli_module.tool_version() == want


def test_bad_head_device_is_one_line_and_run_checks_it_before_extracting(small_cache, tiny_data, tmp_path):
    r = CliRunner().invoke(cli, ["train-head", str(small_cache), "--out", str(tmp_path / "h"), "--device", "tpu"])
    assert r.exit_code == 1 and "Error: unknown device 'tpu': use auto, cpu or cuda" in r.output
    r = CliRunner().invoke(cli, ["run", str(tiny_data), "--out", str(tmp_path / "r"), "--weights", "none",
                                 "--head-device", "tpu"])
    assert r.exit_code == 1 and "unknown device 'tpu'" in r.output and not (tmp_path / "r" / "features.h5").exists()

