"""--backbone timm:NAME: features are timm's own pooled pre-logits on timm's own eval transform (a ViT and a
ConvNeXt, whose preprocessing differs from ResNet's), weights from a local .safetensors / .pth or random;
runs predict and finetune through the run folder; nothing else imports timm. Offline: random weights saved
to temp files."""
import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cache import read_cache
from cli import cli
from tests.conftest import make_dataset
from tests.test_startup import _modules_after

timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")

LAYOUT = {"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}}
# name -> (weights file suffix, the Preprocess fields its data config gives)
MODELS = {
    "vit_tiny_patch16_224": (".safetensors", {"resize": 248, "crop": 224, "interpolation": "bicubic",
                                              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}),
    "convnext_atto": (".pth", {"resize": 256, "crop": 224, "interpolation": "bicubic",
                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}),
    "efficientnet_b0": (".safetensors", {"resize": 256, "crop": 224, "interpolation": "bicubic"}),
}


def _random_model(name: str, seed: int = 7):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False).eval()


def _save(model, path):
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path


def _larger_photos(root):
    """Photos of several sizes and aspect ratios (the resize and crop matter), two classes."""
    make_dataset(root, LAYOUT)
    rng = np.random.default_rng(0)
    for i, f in enumerate(sorted(root.rglob("*.jpg"))):
        w, h = [(300, 200), (180, 320), (260, 260)][i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(f)
    return root


@pytest.mark.parametrize("name", list(MODELS))
def test_features_equal_timms_own_forward_on_its_own_transform(name, tmp_path):
    from timm.data import create_transform, resolve_model_data_config

    suffix, preset = MODELS[name]
    model = _random_model(name)
    weights = _save(model, tmp_path / f"w{suffix}")
    data = _larger_photos(tmp_path / "data")
    r = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(tmp_path / "c.h5"), "--backbone",
                                 f"timm:{name}", "--weights", str(weights), "--workers", "0"])
    assert r.exit_code == 0, r.output
    c = read_cache(tmp_path / "c.h5")
    spec = c.meta.transform["spec"]
    for k, v in preset.items():
        assert spec[k] == (pytest.approx(v) if isinstance(v, list) else v), k
    assert (spec["resize"], spec["interpolation"]) != (256, "bilinear")  # not ResNet's tutorial preset
    assert c.meta.backbone_spec["kind"] == "timm" and c.meta.backbone == f"timm:{name}"
    transform = create_transform(**resolve_model_data_config(model))  # timm's own eval transform
    paths = list(c.splits["train"].paths) + list(c.splits["val"].paths)
    x = torch.stack([transform(Image.open(data / p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        want = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    got = np.concatenate([c.splits["train"].features, c.splits["val"].features])
    assert got.shape == want.shape == (6, model.num_features)
    scale = float(np.abs(want).max())
    assert scale > 0 and float(want.std(0).max()) > 0.01 * scale  # not zeros, and the photos differ
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name, resize, crop, dim", [
    ("vit_small_patch14_dinov2.lvd142m", 518, 518, 384),  # DINOv2 ViT-S/14: 518 px, crop_pct 1
    ("vit_base_patch16_clip_224.openai", 248, 224, 768),  # CLIP: its own mean and std
    ("efficientnet_b0", 256, 224, 1280),
    ("convnext_atto", 256, 224, 320),
])
def test_the_preset_is_timms_own_eval_transform(name, resize, crop, dim):
    """For the families (ViT: DINOv2, CLIP; EfficientNet; ConvNeXt) the spec equals timm's create_transform
    of the model's data config, step by step (models laid out on the meta device: no weights needed)."""
    from timm.data import create_transform, resolve_model_data_config
    from torchvision import transforms as T

    from pipeline.preprocess import Preprocess
    from pipeline.timm_backbone import feature_dim, network, preset

    spec = Preprocess(**preset(name))
    steps = create_transform(**resolve_model_data_config(network(name, meta=True))).transforms
    r, c, n = (next(t for t in steps if isinstance(t, k)) for k in (T.Resize, T.CenterCrop, T.Normalize))
    assert (spec.resize, spec.crop) == (r.size, c.size[0]) == (resize, crop)
    assert spec.interpolation == r.interpolation.value and c.size == (crop, crop)
    np.testing.assert_allclose(spec.mean + spec.std, [*n.mean.tolist(), *n.std.tolist()], rtol=1e-6)
    assert feature_dim(network(name, meta=True)) == dim


def test_a_model_without_classes_loads_every_weight(tmp_path):
    """DINOv2's default has no classifier (head = Identity): no layer inside it is mistaken for one."""
    from pipeline.timm_backbone import build, classifier_name, network

    name = "vit_small_patch14_dinov2.lvd142m"
    assert classifier_name(network(name, meta=True)) == "head"
    model = _random_model(name, seed=3)
    weights = _save(model, tmp_path / "w.safetensors")
    built, head, _ = build(name, str(weights), 0)
    got = built.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k


def test_a_finetuned_model_without_default_classes_is_rebuilt_for_predict():
    """finetune gives DINOv2 (no classifier by default) a 2-class head; predict lays out the same model from
    the record alone and takes every weight back."""
    from types import SimpleNamespace

    from pipeline.finetune import build_classifier
    from pipeline.predict import _finetuned_model

    name = "timm:vit_small_patch14_dinov2.lvd142m"
    model, head, _ = build_classifier(name, "none", 0, 2)
    assert head == "head" and model.get_submodule("head").out_features == 2
    record = SimpleNamespace(arch=name, head=head, class_names=["ants", "bees"], state_dict=model.state_dict())
    again = _finetuned_model(record, "model.pt")
    x = torch.rand(1, 3, 518, 518)
    with torch.inference_mode():
        torch.testing.assert_close(again.eval()(x), model.eval()(x))


def test_random_weights_are_seeded_and_the_digest_tells_them_apart():
    from pipeline.backbones import BackboneSpec, build_backbone

    a, b, c = (build_backbone(BackboneSpec("timm:convnext_atto", "none", s)) for s in (1, 1, 2))
    assert a.weights_digest == b.weights_digest != c.weights_digest
    assert a.feature_dim == 320 and a.description["weights"] == "none"


def test_missing_hub_weights_and_unknown_names_are_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty hub cache
    data = make_dataset(tmp_path / "data", LAYOUT)
    for backbone, words in [("timm:vit_tiny_patch16_224", "timm's pretrained weights for vit_tiny_patch16_224"),
                            ("timm:no_such_model", "timm has no model 'no_such_model'")]:
        r = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(tmp_path / "c.h5"), "--backbone", backbone,
                                     "--workers", "0"])
        assert r.exit_code == 1 and words in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(tmp_path / "c.h5"), "--backbone",
                                 "timm:vit_tiny_patch16_224", "--workers", "0"])
    assert f"{tmp_path / 'hf'}/models--timm--vit_tiny_patch16_224" in r.output and "TLEARN_OFFLINE=1" in r.output


def test_imagenet_weights_come_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """--weights imagenet: timm's file where huggingface_hub keeps it (repo timm/NAME.TAG, refs/main ->
    snapshots/REV/model.safetensors), no network."""
    from huggingface_hub import constants

    from pipeline.backbones import BackboneSpec, build_backbone, state_dict_digest

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "models--timm--convnext_atto.d2_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    model = _random_model("convnext_atto", seed=11)
    _save(model, repo / "snapshots" / "0123abcd" / "w.safetensors").rename(
        repo / "snapshots" / "0123abcd" / "model.safetensors")
    bb = build_backbone(BackboneSpec("timm:convnext_atto", "imagenet"))
    want = state_dict_digest({k: v for k, v in model.state_dict().items() if not k.startswith("head.fc.")})
    assert bb.weights_digest == want and bb.description["weights"] == "imagenet"
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(bb.module(x), model.forward_head(model.forward_features(x), pre_logits=True))


def test_head_run_predicts_and_exports_on_its_timm_backbone(tmp_path):
    model = _random_model("convnext_atto")
    weights = _save(model, tmp_path / "w.pth")
    data = _larger_photos(tmp_path / "data")
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(data), "--out", str(out), "--backbone", "timm:convnext_atto",
                                 "--weights", str(weights), "--workers", "0", "--epochs", "2", "--no-plots"])
    assert r.exit_code == 0, r.output
    c = read_cache(out / "features.h5")
    m = torch.load(out / "model.pt", weights_only=True)
    t = m.get("temperature") or 1.0
    want = torch.softmax((torch.tensor(c.splits["val"].features) @ m["state_dict"]["weight"].T
                          + m["state_dict"]["bias"]) / t, 1)
    r = CliRunner().invoke(cli, ["predict", str(out), *[str(data / p) for p in c.splits["val"].paths], "--json"])
    assert r.exit_code == 0, r.output
    got = torch.tensor([[row["probabilities"]["ants"], row["probabilities"]["bees"]] for row in json.loads(r.stdout)])
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)
    for name in ("m.pt2", "m.onnx"):  # the run's own preprocessing goes with it (ConvNeXt: Resize 256 bicubic)
        r = CliRunner().invoke(cli, ["export", str(out), "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    extra = {"preprocess.json": ""}
    prog = torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra).module()
    assert json.loads(extra["preprocess.json"])["interpolation"] == "bicubic"
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    x = torch.rand(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["preprocess"])["resize"] == 256
    with torch.no_grad():
        want = prog(x)
    want = want[0] if isinstance(want, tuple) else want
    np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], want.numpy(), atol=1e-4, rtol=0)


def test_finetune_replaces_the_classifier_the_timm_way_and_predicts(tmp_path):
    from pipeline.finetune import build_classifier

    model, head, _ = build_classifier("timm:convnext_atto", "none", 0, 3)
    assert head == "head.fc" and model.get_submodule(head).out_features == 3 and model.num_classes == 3
    data = make_dataset(tmp_path / "data", LAYOUT)
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["finetune", str(data), "--out", str(out), "--backbone", "timm:convnext_atto",
                                 "--weights", "none", "--workers", "0", "--epochs", "1", "--no-plots"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["predict", str(out), str(data / "val"), "--json"])
    assert r.exit_code == 0, r.output
    assert r.output.count('"class"') == 2


def test_extract_train_head_and_predict_of_other_backbones_never_import_timm(tmp_path):
    data = make_dataset(tmp_path / "data", LAYOUT)
    out, cache = tmp_path / "run", tmp_path / "c.h5"
    code = ("from click.testing import CliRunner\nfrom cli import cli\n"
            f"r = CliRunner().invoke(cli, ['extract', {str(data)!r}, '--cache', {str(cache)!r}, '--weights', 'none', "
            "'--workers', '0'])\nassert r.exit_code == 0, r.output\n"
            f"r = CliRunner().invoke(cli, ['train-head', {str(cache)!r}, '--out', {str(out)!r}, '--epochs', '1', "
            "'--no-plots'])\nassert r.exit_code == 0, r.output\n"
            f"r = CliRunner().invoke(cli, ['predict', {str(out)!r}, {str(data / 'val')!r}])\n"
            "assert r.exit_code == 0, r.output\n"
            "r = CliRunner().invoke(cli, ['extract', '--help'])\nassert r.exit_code == 0\n")
    loaded = _modules_after(code)
    assert "torch" in loaded and "timm" not in loaded and "huggingface_hub" not in loaded


def test_without_timm_a_timm_backbone_is_one_line(tmp_path, monkeypatch):
    from pipeline import timm_backbone

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    timm_backbone.preset.cache_clear()
    data = make_dataset(tmp_path / "data", LAYOUT)
    r = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(tmp_path / "c.h5"), "--backbone",
                                 "timm:convnext_atto", "--weights", "none", "--workers", "0"])
    assert r.exit_code == 1 and r.output.strip() == ("Error: --backbone timm:NAME needs timm: pip install "
                                                     "'tlearn[timm]' (or pip install timm)")
