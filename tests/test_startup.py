"""Start-up and exit: what --help and each command import (torchvision, torch._dynamo, scikit-learn and
matplotlib cost seconds), and the quick exit that skips torch's teardown."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

HEAVY = ("torch", "torchvision", "numpy", "h5py", "sklearn", "matplotlib", "scipy")
COMMANDS = ("extract", "train-head", "run", "finetune", "predict", "export", "report", "info", "download", "preview")


def _modules_after(code: str, cwd=REPO) -> set[str]:
    """Top-level modules loaded by a fresh interpreter that runs code (then prints sys.modules)."""
    prog = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    r = subprocess.run([sys.executable, "-c", prog], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def test_every_command_help_imports_nothing_heavy():
    code = ("from click.testing import CliRunner\nfrom cli import cli\n"
            f"for c in {COMMANDS!r} + ('',):\n"
            "    r = CliRunner().invoke(cli, [c, '--help'] if c else ['--help'])\n"
            "    assert r.exit_code == 0 and 'Usage' in r.output, (c, r.output)\n")
    assert not _modules_after(code) & set(HEAVY)


def test_train_head_draws_in_its_own_process_and_never_imports_torchvision_or_sklearn(small_cache, tmp_path):
    """train-head's report is numpy and its pictures matplotlib, drawn in the command's own process."""
    out = tmp_path / "run"
    code = ("from click.testing import CliRunner\nfrom cli import cli\n"
            f"r = CliRunner().invoke(cli, ['train-head', {str(small_cache)!r}, '--out', {str(out)!r}, '--epochs', '2'])\n"
            "assert r.exit_code == 0, r.output\n"
            "assert 'precision    recall  f1-score   support' in r.output, r.output\n")
    loaded = _modules_after(code)
    assert {"torch", "h5py", "matplotlib"} <= loaded and not loaded & {"torchvision", "sklearn", "scipy"}
    for name in ("model.pt", "metrics.json", "report.txt", "curves.png", "confusion.png", "predictions.png"):
        assert (out / name).stat().st_size > 0, name
    no_plots = _modules_after(code.replace("'--epochs', '2'", "'--epochs', '2', '--no-plots'")
                              .replace(str(out), str(tmp_path / "no_plots")))
    assert "matplotlib" not in no_plots  # --no-plots: nothing of the pictures is imported


@pytest.mark.slow
def test_extract_and_predict_never_import_torchvision_or_dynamo(tiny_data, tmp_path):
    """torchvision pulls torch._dynamo in (seconds); so does any use of torch.optim. The default backbone and
    its eval transforms do without both. finetune steps torch.optim (dynamo then) and augments with torchvision's
    transforms (+0.15 s beside dynamo); it runs last here and must still work."""
    code = ("from click.testing import CliRunner\nfrom cli import cli\n"
            f"r = CliRunner().invoke(cli, ['run', {str(tiny_data)!r}, '--out', {str(tmp_path / 'r')!r}, "
            "'--weights', 'none', '--workers', '0', '--epochs', '2', '--no-plots'])\n"
            "assert r.exit_code == 0, r.output\n"
            f"r = CliRunner().invoke(cli, ['predict', {str(tmp_path / 'r')!r}, {str(tiny_data / 'val')!r}])\n"
            "assert r.exit_code == 0 and 'probability' in r.output, r.output\n"
            "import sys\nassert 'torch._dynamo' not in sys.modules and 'torchvision' not in sys.modules\n"
            f"r = CliRunner().invoke(cli, ['finetune', {str(tiny_data)!r}, '--out', {str(tmp_path / 'f')!r}, "
            "'--weights', 'none', '--workers', '0', '--epochs', '1', '--no-plots'])\n"
            "assert r.exit_code == 0, r.output\n")
    loaded = _modules_after(code)
    assert {"torch", "torchvision"} <= loaded


def _cli_process(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_the_quick_exit_loses_no_output_and_keeps_the_exit_code(small_cache, tmp_path):
    """After a command the process ends without torch's teardown; what it printed and wrote is all there,
    and a failing command still exits 1 with its one line."""
    out = tmp_path / "run"
    r = _cli_process("train-head", small_cache, "--out", out, "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith(f"run folder {out}") and "precision    recall" in r.stdout
    r = _cli_process("predict", out, small_cache.parent / "data" / "val", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 4, r.stderr
    clean = _cli_process("predict", out, small_cache.parent / "data" / "val", "--json", env={"TLEARN_CLEAN_EXIT": "1"})
    assert clean.stdout == r.stdout
    bad = _cli_process("predict", tmp_path / "nowhere", small_cache)
    assert bad.returncode == 2 and "does not exist" in bad.stderr  # click's usage error, before any torch
    bad = _cli_process("predict", small_cache.parent, small_cache)
    assert bad.returncode == 1 and bad.stderr.startswith("Error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_the_quick_exit_waits_for_anything_still_running(monkeypatch):
    import threading

    import cli as cli_module

    monkeypatch.delenv("TLEARN_CLEAN_EXIT", raising=False)
    assert cli_module._nothing_left_running()  # torch is loaded in this process, nothing else runs
    monkeypatch.setenv("TLEARN_CLEAN_EXIT", "1")
    assert not cli_module._nothing_left_running()
    monkeypatch.delenv("TLEARN_CLEAN_EXIT")
    release = threading.Event()
    t = threading.Thread(target=release.wait)  # e.g. a checkpoint still being written
    t.start()
    try:
        assert not cli_module._nothing_left_running()
    finally:
        release.set()
        t.join()
    import h5py

    with h5py.File(Path(os.environ["TORCH_HOME"]) / "open.h5", "w"):
        assert not cli_module._nothing_left_running()
    assert cli_module._nothing_left_running()


def test_the_report_and_pictures_never_import_torch(tmp_path):
    """metrics and plots only format what a stage computed: numpy and matplotlib, never torch."""
    loaded = _modules_after("from pipeline import metrics, plots\n"
                            "m = metrics.classification_metrics([0, 1, 1], [0, 1, 0], ['a', 'b'])\n"
                            f"plots.confusion_png(m['confusion_matrix'], ['a', 'b'], {str(tmp_path / 'c.png')!r}, 'val')")
    # the report is numpy (scikit-learn's C x C arrays cost minutes at 10,000 classes): only matplotlib
    assert "matplotlib" in loaded and "torch" not in loaded and "torchvision" not in loaded

