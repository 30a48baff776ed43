"""Integration on the tutorial's real data (../shared/datasets/hymenoptera_data); skipped when absent."""
import json

import pytest
from click.testing import CliRunner

from cache import read_cache
from cli import cli
from tests.conftest import real_data_dir

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(real_data_dir() is None, reason="real dataset is absent")]


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("real") / "features.h5"
    r = CliRunner().invoke(cli, ["extract", str(real_data_dir()), "--cache", str(cache), "--weights", "none"],
                           env={"TLEARN_OFFLINE": "1"})
    assert r.exit_code == 0, r.output
    assert "extracted train 244, val 153 | skipped 1 |" in r.output
    return cache


def test_real_extract_counts(real_cache):
    c = read_cache(real_cache)
    assert c.class_names == ["ants", "bees"]
    assert c.splits["train"].features.shape == (244, 512)
    assert c.splits["val"].features.shape == (153, 512)
    assert c.splits["train"].labels.tolist().count(0) == 123  # 124 ants files, one of them the GIF
    assert c.skipped == [("train/ants/imageNotFound.gif", "not an image extension (.gif)")]
    assert "train/ants/formica.jpeg" in c.splits["train"].paths


def test_real_train_head_25_epochs(real_cache, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train-head", str(real_cache), "--out", str(out), "--recipe", "tutorial"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["history"]) == 25 and 0 <= m["best_epoch"] < 25
    assert m["classification_report"]["val"]["macro avg"]["support"] == 153
    assert m["seconds"] < 5
    for name in ("model.pt", "report.txt", "curves.png", "confusion.png", "predictions.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_real_finetune_one_epoch(tmp_path):
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["finetune", str(real_data_dir()), "--out", str(out), "--weights", "none",
                                 "--epochs", "1"], env={"TLEARN_OFFLINE": "1"})
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == {"train": 244, "val": 153} and len(m["history"]) == 1
    assert m["skipped"] == [["train/ants/imageNotFound.gif", "not an image extension (.gif)"]]
    assert sum(map(sum, m["confusion_matrix"]["val"])) == 153
    for name in ("model.pt", "report.txt", "curves.png", "confusion.png", "predictions.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    r = CliRunner().invoke(cli, ["predict", str(out), str(real_data_dir() / "val/bees"), "--json"])
    assert r.exit_code == 0 and len(json.loads(r.stdout)) == 83
