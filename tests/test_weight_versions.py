"""torchvision's weight versions (--weights IMAGENET1K_V2, DEFAULT, any name of the architecture's weights
enum): each with its own eval preset (ResNet-50 V2 resizes to 232), recorded in the cache's spec and
fingerprint; predict decodes as extract did. Offline: random weights saved in a temp TORCH_HOME under the
enum's file name."""
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cache import read_cache
from cli import cli
from tests.conftest import make_dataset

LAYOUT = {"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}}


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory):
    """Random ResNet-50 weights (seeded), saved once; linked into each test's TORCH_HOME."""
    import torchvision

    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("w50") / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    return path


def _install(torch_home, source, url):
    target = torch_home / "hub" / "checkpoints" / os.path.basename(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(source)
    return target


def _extract(data, cache, *flags):
    return CliRunner().invoke(cli, ["extract", str(data), "--cache", str(cache), "--workers", "0", *flags])


def test_resnet50_v2_extracts_on_its_own_preset_and_equals_the_architecture(tmp_path, offline_torch_home,
                                                                              resnet50_file):
    import torchvision

    enum = torchvision.models.ResNet50_Weights
    _install(offline_torch_home, resnet50_file, enum.IMAGENET1K_V2.url)
    data = make_dataset(tmp_path / "data", LAYOUT)
    r = _extract(data, tmp_path / "c.h5", "--backbone", "resnet50", "--weights", "DEFAULT")
    assert r.exit_code == 0, r.output
    c = read_cache(tmp_path / "c.h5")
    spec = c.meta.transform["spec"]
    assert (spec["resize"], spec["crop"], spec["interpolation"]) == (232, 224, "bilinear")
    assert c.meta.transform["eval"].startswith("Resize(232, bilinear")
    assert c.meta.weights == "IMAGENET1K_V2"  # DEFAULT resolved: the run stays what it was if DEFAULT moves
    model = torchvision.models.resnet50(weights=None)
    model.load_state_dict(torch.load(resnet50_file, weights_only=True))
    model.fc = torch.nn.Identity()
    model.eval()
    preset = enum.IMAGENET1K_V2.transforms()  # the enum's own eval transform
    paths = c.splits["val"].paths
    x = torch.stack([preset(Image.open(data / p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        want = model(x).numpy()
    got = c.splits["val"].features
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def test_versions_differ_in_fingerprint_and_v1_keeps_the_tutorial_preset(tmp_path, offline_torch_home,
                                                                         resnet50_file):
    import torchvision

    enum = torchvision.models.ResNet50_Weights
    for w in (enum.IMAGENET1K_V1, enum.IMAGENET1K_V2):  # the same random file under both names
        _install(offline_torch_home, resnet50_file, w.url)
    data = make_dataset(tmp_path / "data", {"train": {"ants": 1, "bees": 1}})
    for name in ("IMAGENET1K_V1", "IMAGENET1K_V2"):
        r = _extract(data, tmp_path / f"{name}.h5", "--backbone", "resnet50", "--weights", name, "--splits", "train")
        assert r.exit_code == 0, r.output
    v1, v2 = (read_cache(tmp_path / f"{n}.h5").meta for n in ("IMAGENET1K_V1", "IMAGENET1K_V2"))
    assert v1.transform["spec"]["resize"] == 256 and v2.transform["spec"]["resize"] == 232
    assert v1.fingerprint != v2.fingerprint


def test_missing_version_file_offline_is_one_line_naming_the_file(tmp_path, offline_torch_home):
    data = make_dataset(tmp_path / "data", LAYOUT)
    r = _extract(data, tmp_path / "c.h5", "--backbone", "resnet50", "--weights", "IMAGENET1K_V2")
    assert r.exit_code == 1 and "Traceback" not in r.output
    line = r.output.strip()
    assert len(line.splitlines()) == 1 and "IMAGENET1K_V2 weights for resnet50 are not in the torch cache" in line
    assert str(offline_torch_home / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in line
    r = _extract(data, tmp_path / "c.h5", "--backbone", "resnet50", "--weights", "IMAGENET1K_V7")
    assert r.exit_code == 1 and "resnet50 has no weights IMAGENET1K_V7: its versions are IMAGENET1K_V1, " \
                                "IMAGENET1K_V2, DEFAULT" in r.output
    assert not (tmp_path / "c.h5").exists()


def test_a_version_run_predicts_on_the_recorded_preset(tmp_path, offline_torch_home, resnet18_state_file):
    """resnet18 V1 via its enum name: run + predict rebuild the same backbone and preset from the record."""
    import torchvision

    _install(offline_torch_home, resnet18_state_file, torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    data = make_dataset(tmp_path / "data", LAYOUT)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(data), "--out", str(out), "--weights", "IMAGENET1K_V1", "--workers", "0",
                                 "--epochs", "1", "--no-plots"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["predict", str(out), str(data / "val"), "--json"])
    assert r.exit_code == 0, r.output
    assert r.output.count('"class"') == 2


def test_a_safetensors_state_dict_is_read_for_a_torchvision_architecture(tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is not installed")
    from safetensors.torch import save_file

    from pipeline.backbones import BackboneSpec, build_backbone, load_state_dict_file

    sd = build_backbone(BackboneSpec("resnet18", "none", 4)).module.net.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    assert load_state_dict_file(tmp_path / "w.safetensors").keys() == sd.keys()
    again = build_backbone(BackboneSpec("resnet18", str(tmp_path / "w.safetensors")))
    assert again.weights_digest == build_backbone(BackboneSpec("resnet18", "none", 4)).weights_digest
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(Exception, match="cannot read weights file"):
        load_state_dict_file(tmp_path / "bad.safetensors")
