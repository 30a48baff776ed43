"""scripts/quickstart.sh's decisions, through its --dry-run (prints the commands, runs none)."""
import os
import subprocess
import sys
from pathlib import Path


from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "quickstart.sh"


def dry_run(tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k not in ("DATA", "OUT", "WEIGHTS", "VENV")}
    full.update(env)
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=full, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_fresh_machine_creates_the_venv_installs_and_runs(tmp_path):
    venv = tmp_path / "venv"
    out = dry_run(tmp_path, VENV=str(venv), DATA="photos", OUT="runs/x", WEIGHTS="none")
    assert out.splitlines() == [
        f"+ python3 -m venv {venv}",
        f"+ {venv}/bin/python -m pip install --quiet --upgrade pip",
        f"+ {venv}/bin/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1",
        f"+ {venv}/bin/python -m pip install --quiet -e .[test]",
        "quickstart: data: photos",
        f"+ {venv}/bin/python cli.py run photos --out runs/x --backbone resnet18 --weights none",
        f"quickstart: done: report in runs/x/report.txt; classify photos with: {venv}/bin/python cli.py predict "
        "runs/x PHOTO_OR_FOLDER",
    ]
    assert not venv.exists()  # a dry run changes nothing


def test_ready_venv_is_reused_and_data_found_or_downloaded(tmp_path):
    venv = Path(sys.prefix)  # this test's own environment has every package
    out = dry_run(tmp_path, VENV=str(venv))
    assert f"quickstart: {venv} already has torch, torchvision and the other packages" in out
    assert "pip install" not in out
    shared = REPO.parent / "shared/datasets/hymenoptera_data"
    if (shared / "train").is_dir():
        assert "quickstart: data: ../shared/datasets/hymenoptera_data" in out and "cli.py download" not in out
    elif not (REPO / "data/hymenoptera_data/train").is_dir():
        assert f"+ {venv}/bin/python cli.py download data/" in out
    assert ("would use resnet18 --weights imagenet if its file is in the torch cache or can be downloaded, else "
            "--backbone efficientnet_lite0 (ImageNet weights shipped in its package)") in out
    assert "cli.py run" in out and "--out runs/quickstart --backbone resnet18 --weights imagenet" in out


def test_unknown_argument_is_refused():
    r = subprocess.run(["bash", str(SCRIPT), "--now"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == "usage: bash scripts/quickstart.sh [--dry-run]"


def test_offline_without_data_says_how_to_point_at_a_folder_and_leaves_no_data_folder(tmp_path):
    """No ../shared copy and no network: the download fails; the quick start says how to give it a folder
    (DATA=DIR) and removes the data/ folder it made (empty). A data/ the user had is left alone."""
    checkout = tmp_path / "work" / "checkout"  # no ../shared beside it
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "scripts" / "quickstart.sh").write_bytes(SCRIPT.read_bytes())
    # stands in for `cli.py download` without a network: it makes DEST, then fails as the real one does
    (checkout / "cli.py").write_text(
        "import pathlib, sys\n"
        "pathlib.Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)\n"
        "print('Error: cannot download https://x/hymenoptera_data.zip: no network; fetch it by hand and unzip '\n"
        "      'it into the destination', file=sys.stderr)\n"
        "sys.exit(1)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "OUT", "WEIGHTS", "VENV")}
    env.update(VENV=sys.prefix, WEIGHTS="none")
    r = subprocess.run(["bash", str(checkout / "scripts" / "quickstart.sh")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"+ {sys.prefix}/bin/python cli.py download data/" in r.stdout and "cli.py run" not in r.stdout
    assert r.stderr.splitlines()[-1] == (
        "quickstart: no dataset: point the quick start at a folder of images with DATA=DIR bash "
        "scripts/quickstart.sh (DIR holds train/ and val/ folders of class folders, or class folders only), or "
        "unzip hymenoptera_data.zip into data/ and rerun")
    assert not (checkout / "data").exists()
    (checkout / "data").mkdir()  # the user's own folder stays
    (checkout / "data" / "notes.txt").write_text("mine")
    r = subprocess.run(["bash", str(checkout / "scripts" / "quickstart.sh")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 1 and (checkout / "data" / "notes.txt").read_text() == "mine"


def fake_checkout(tmp_path, resnet_ok: bool, lite_ok: bool) -> Path:
    """The quick start beside stand-ins: a `pipeline` whose ResNet-18 weights and Lite0 package are there or
    not, and a cli.py that prints what it was asked (so the script's choice is seen, nothing is run)."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "scripts" / "quickstart.sh").write_bytes(SCRIPT.read_bytes())
    (checkout / "data" / "train").mkdir(parents=True)
    pkg = checkout / "pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("class PipelineError(Exception):\n    pass\n")
    (pkg / "backbones.py").write_text(
        "from . import PipelineError\nclass BackboneSpec:\n    def __init__(self, *a): pass\n"
        f"def build_torchvision(spec):\n    if not {resnet_ok}: raise PipelineError('no file, no network')\n")
    (pkg / "packaged.py").write_text(f"def available():\n    return {lite_ok}\n")
    (checkout / "cli.py").write_text("import sys\nprint('cli', *sys.argv[1:])\n")
    return checkout


def run_fake(checkout) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DATA", "OUT", "WEIGHTS", "VENV", "BACKBONE")}
    env.update(VENV=sys.prefix, DATA="data", OUT="runs/q")
    r = subprocess.run(["bash", str(checkout / "scripts" / "quickstart.sh")], capture_output=True, text=True,
                       env=env, timeout=120, cwd=checkout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_without_resnet_weights_the_offline_backbone_is_used_and_said_in_one_line(tmp_path):
    r = run_fake(fake_checkout(tmp_path, resnet_ok=False, lite_ok=True))
    assert "cli run data --out runs/q --backbone efficientnet_lite0 --weights imagenet" in r.stdout
    assert r.stderr.splitlines() == [
        "quickstart: ResNet-18's ImageNet weights are not in the torch cache and cannot be downloaded, so this run "
        "uses --backbone efficientnet_lite0 (ImageNet weights shipped in its package, offline)"]


def test_resnet_weights_stay_the_default_and_random_init_is_the_last_resort(tmp_path):
    r = run_fake(fake_checkout(tmp_path / "a", resnet_ok=True, lite_ok=True))
    assert "cli run data --out runs/q --backbone resnet18 --weights imagenet" in r.stdout and r.stderr == ""
    r = run_fake(fake_checkout(tmp_path / "b", resnet_ok=False, lite_ok=False))
    assert "cli run data --out runs/q --backbone resnet18 --weights none" in r.stdout
    assert r.stderr.startswith("quickstart: WARNING: no ImageNet weights here") and len(r.stderr.splitlines()) == 1
