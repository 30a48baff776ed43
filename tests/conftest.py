"""Shared fixtures: tiny synthetic image folders, offline torch cache, the real dataset when present."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path | None:
    candidates = [os.environ.get("TLEARN_REAL_DATA", ""), REPO.parent / "shared/datasets/hymenoptera_data"]
    for c in candidates:
        if c and (Path(c) / "train").is_dir() and (Path(c) / "val").is_dir():
            return Path(c)
    return None


@pytest.fixture(autouse=True)
def offline_torch_home(tmp_path_factory, monkeypatch):
    """No test may touch the network or the user's torch cache."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("TLEARN_OFFLINE", "1")
    return home


def write_image(path: Path, label: int, seed: int, size=(48, 36), fmt=None) -> Path:
    """A small image whose colour depends on its class, so a head can learn it."""
    rng = np.random.default_rng(seed)
    base = np.array([[200, 60, 40], [40, 90, 200], [60, 180, 60]][label % 3], dtype=np.float64)
    arr = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)
    return path


def make_dataset(root: Path, layout: dict[str, dict[str, int]], ext: str = ".jpg") -> Path:
    """layout = {split: {class: count}} -> root/split/class/img_000.jpg ..."""
    seed = 0
    for split, classes in layout.items():
        for ci, (cls, n) in enumerate(sorted(classes.items())):
            for i in range(n):
                write_image(root / split / cls / f"img_{i:03d}{ext}", ci, seed)
                seed += 1
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """6 train + 4 val images, two classes."""
    return make_dataset(tmp_path / "data", {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "bees": 2}})


@pytest.fixture
def real_data() -> Path:
    path = real_data_dir()
    if path is None:
        pytest.skip("real dataset ../shared/datasets/hymenoptera_data is absent")
    return path


@pytest.fixture(scope="session")
def resnet18_state_file(tmp_path_factory) -> Path:
    """A random ResNet-18 state_dict on disk (stands in for real weights), seeded."""
    import torch
    import torchvision

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pt"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.fixture
def interrupt_second_batch(monkeypatch):
    """Makes extract's second forward pass raise KeyboardInterrupt (a kill after the first finished batch);
    returns a function that restores the real forward for the rerun."""
    import pipeline.extract as ex

    real = ex.forward_features
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ex, "forward_features", dying)
    return lambda: monkeypatch.setattr(ex, "forward_features", real)


SMALL = {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "bees": 2}}  # the small two-class folder


def small_extracted(root: Path, cache_name: str = "f.h5") -> tuple[Path, Path]:
    """(data, cache): root/data made as SMALL and its random-init cache root/cache_name, through the CLI."""
    from click.testing import CliRunner

    from cli import cli

    data = make_dataset(root / "data", SMALL)
    cache = root / cache_name
    r = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(cache), "--weights", "none", "--workers", "0"])
    assert r.exit_code == 0, r.output
    return data, cache


def head_run_folder(root: Path, layout: dict, *flags: str) -> tuple[Path, Path]:
    """(data, run): root/data made from layout and a head run of it through `cli.py run` (random init, no
    workers, no pictures, offline) with flags added."""
    from click.testing import CliRunner

    from cli import cli

    data = make_dataset(root / "data", layout)
    out = root / "run"
    r = CliRunner().invoke(cli, ["run", str(data), "--out", str(out), "--weights", "none", "--workers", "0",
                                 "--no-plots", *flags], env={"TLEARN_OFFLINE": "1"})
    assert r.exit_code == 0, r.output
    return data, out


def finetune_config(data, out, **kw):
    """A FinetuneConfig for tests: random init, no workers, 2 epochs unless told otherwise."""
    from pipeline.finetune import FinetuneConfig

    kw.setdefault("weights", "none")
    kw.setdefault("workers", 0)
    kw.setdefault("epochs", 2)
    return FinetuneConfig(data_dir=str(data), out=str(out), **kw)


@pytest.fixture(scope="session")
def small_cache(tmp_path_factory) -> Path:
    """SMALL's random-init cache, extracted once (its images in small_cache.parent / "data"); read only."""
    return small_extracted(tmp_path_factory.mktemp("small"), "feats.h5")[1]
