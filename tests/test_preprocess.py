"""The preprocessing spec: one source for the transforms (PIL and device paths), the fingerprint and the
record; uint8 crops normalised on the device; bounded work for absurd aspect ratios."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T

from cache import read_cache
from cache.store import fingerprint
from pipeline import PipelineError
from pipeline import preprocess as pp
from pipeline.data import ImageFiles, eval_transform, load_rgb, normalize_batch, uint8_transform
from pipeline.device_decode import collate_raw, decode_crops, read_for_device, resize_crop_tensors
from pipeline.extract import ExtractConfig, extract, feature_fields, preprocess_for
from pipeline.preprocess import Preprocess, resolve_decoder
from tests.conftest import REPO, make_dataset, write_image

# The tutorial's eval transform as torchvision spells it: the reference every path is compared with.
REFERENCE = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                       T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
# The `transform` description caches were fingerprinted with before the spec existed (main, cd98f52).
LEGACY_TRANSFORM = {
    "eval": "Resize(256, bilinear, antialias) CenterCrop(224) ToTensor Normalize(imagenet)",
    "views": "RandomResizedCrop(224, scale=(0.08,1), ratio=(3/4,4/3)) RandomHorizontalFlip ToTensor Normalize(imagenet)",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "exif_transpose": True,
    "rgb": "16-bit scaled to 8, alpha over white",
}
DESC = {"kind": "torchvision", "backbone": "resnet18", "weights_digest": "abc123"}


@pytest.mark.parametrize("args, expected", [
    (("fp32", 0, 0, False, "pil"), "82d5fe83fc9007b879187c2ac8ea11d6c916efff0ccfdc2081ed3e4c3bee6291"),
    (("fp32", 0, 0, True, "pil"), "060402d013e374b4f7e20474878ba9924e0f6b2b0ab06340c4c74adf1d848f73"),
    # with views: another fingerprint since issue 28 (views drawn from the photo's sha256, not its path, so
    # they follow it; a cache whose views were drawn from paths cannot be updated by content); was 4e5a3f77...
    (("fp32", 2, 5, False, "pil"), "fada402c0a122c6377ff75b2054ce3c3a6dda4e76f048314966035a2515a5443"),
])
def test_caches_made_before_the_spec_keep_their_fingerprint(args, expected):
    """Fingerprints computed on main before the spec existed: caches made then stay valid."""
    precision, views, seed, draft, decoder = args
    assert fingerprint(feature_fields(DESC, precision, views, seed, draft, decoder)) == expected
    spec = Preprocess(draft=draft, decoder=decoder)
    assert fingerprint(feature_fields(DESC, precision, views, seed, spec=spec)) == expected
    assert Preprocess().describe() == LEGACY_TRANSFORM


def test_older_torchvision_decoder_caches_are_rebuilt_not_mixed():
    """Its odd JPEGs and PNGs now take PIL's resize (up to 1/255 a pixel apart): an older cache of that
    decoder gets another fingerprint, so an incremental extract never mixes the two resizes."""
    old = "dd5b83487dbfa1b324093a4f8daee9f05f124938f2675b982c48b5c3f19972db"  # bf16, torchvision, before
    now = fingerprint(feature_fields(DESC, "bf16", 0, 0, spec=Preprocess(decoder="torchvision")))
    assert now != old
    assert fingerprint(feature_fields(DESC, "bf16", 0, 0, False, "torchvision")) == now


def test_other_specs_change_the_fingerprint_and_records_round_trip():
    prints = {fingerprint(feature_fields(DESC, "fp32", 0, 0, spec=s)) for s in [
        Preprocess(), Preprocess(resize=288), Preprocess(crop=192), Preprocess(interpolation="bicubic"),
        Preprocess(mean=(0.5, 0.5, 0.5)), Preprocess(exif=False), Preprocess(draft=True),
        Preprocess(decoder="torchvision"), Preprocess(decoder="torchvision", antialias=False)]}
    assert len(prints) == 9
    spec = Preprocess(resize=288, crop=256, interpolation="bicubic", std=(0.2, 0.2, 0.2), exif=False)
    rec = json.loads(json.dumps(spec.record()))
    assert Preprocess.from_record(rec) == spec
    # a cache or run from before the spec: the legacy description plus its draft/decoder attrs
    assert Preprocess.from_record(LEGACY_TRANSFORM, True, "pil") == Preprocess(draft=True)
    assert Preprocess.from_record(LEGACY_TRANSFORM, False, "torchvision") == Preprocess(decoder="torchvision")
    assert Preprocess.from_record(None) == Preprocess()
    with pytest.raises(PipelineError, match=r"rebuild the cache with `extract --force`"):
        Preprocess.from_record({**LEGACY_TRANSFORM, "eval": "Resize(300) ..."})
    with pytest.raises(PipelineError, match="unknown fields future"):
        Preprocess.from_record({"spec": {**Preprocess().to_json(), "future": 1}})


@pytest.mark.parametrize("kw, message", [
    ({"crop": 300}, "need 0 < crop <= resize"), ({"interpolation": "lanczos"}, "interpolation 'lanczos'"),
    ({"std": (0, 1, 1)}, "std > 0"), ({"antialias": False}, "pil decoder always antialiases"),
    ({"decoder": "torchvision", "draft": True}, "draft decoding exists in the pil decoder only"),
])
def test_bad_specs_are_refused(kw, message):
    with pytest.raises(PipelineError, match=message):
        Preprocess(**kw)


def test_auto_decoder_is_torchvision_on_cuda_only_and_recorded_as_used(tiny_data, tmp_path):
    assert resolve_decoder("auto", "cuda") == "torchvision"
    assert resolve_decoder("auto", "cpu") == "pil"
    assert resolve_decoder("auto", "cuda", views=2) == "pil" and resolve_decoder("auto", "cuda", draft=True) == "pil"
    with pytest.raises(PipelineError, match="works without --views and --draft"):
        resolve_decoder("torchvision", "cpu", views=2)
    with pytest.raises(PipelineError, match="unknown decoder 'nvjpeg'"):
        resolve_decoder("nvjpeg", "cpu")
    cfg = ExtractConfig(str(tiny_data), str(tmp_path / "a.h5"), weights="none", workers=0)
    assert cfg.decoder == "auto" and preprocess_for(cfg, torch.device("cpu")).decoder == "pil"
    extract(cfg)
    c = read_cache(tmp_path / "a.h5")
    assert c.attrs["decoder"] == "pil"
    assert json.loads(c.attrs["transform"])["spec"] == Preprocess(draft=2).to_json()  # the pil decoder drafts JPEGs by default (fast)


def _odd_images(tmp_path):
    """Landscape, portrait, square, already 256 on the short side, smaller than the crop, a PNG."""
    sizes = [(500, 375), (333, 500), (300, 300), (341, 256), (256, 400), (40, 30), (225, 224)]
    return [write_image(tmp_path / f"i{k}.{'png' if k % 3 == 0 else 'jpg'}", k, k, size=s)
            for k, s in enumerate(sizes)]


def test_uint8_crops_normalised_in_one_op_equal_the_reference_bit_for_bit(tmp_path):
    files = _odd_images(tmp_path)
    imgs = [load_rgb(f) for f in files]
    ref = torch.stack([REFERENCE(i) for i in imgs])
    crops = torch.stack([uint8_transform()(i) for i in imgs])
    assert crops.dtype == torch.uint8 and crops.shape == (len(files), 3, 224, 224)
    assert torch.equal(normalize_batch(crops, Preprocess()), ref)
    assert torch.equal(torch.stack([eval_transform()(i) for i in imgs]), ref)
    # the worker's item: 3 x 224 x 224 uint8 (150 KB), views uint8 too
    x, v, *_ = ImageFiles([([str(files[0])], ["a"], 2)])[(0, 0)]
    assert x.dtype == v.dtype == torch.uint8 and x.numel() == 150_528 and v.shape == (2, 3, 224, 224)


def _resnet(seed=0):
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(weights=None)
    m.fc = nn.Identity()
    return m.eval()


def _extract_vs_reference(data, tmp_path, state_file, splits=("train", "val")):
    extract(ExtractConfig(str(data), str(tmp_path / "f.h5"), weights=str(state_file), workers=0, batch_size=3,
                          splits=splits))
    c = read_cache(tmp_path / "f.h5")
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(torch.load(state_file, weights_only=True))
    model.fc = nn.Identity()
    model.eval()
    worst = 0.0
    for split in splits:
        sp = c.splits[split]
        with torch.no_grad():
            ref = torch.cat([model(REFERENCE(load_rgb(data / p))[None]) for p in sp.paths]).numpy()
        worst = max(worst, float(np.abs(sp.features - ref).max()))
    return worst


def test_features_equal_the_float_pil_path(tmp_path, resnet18_state_file):
    data = tmp_path / "data"
    for k, f in enumerate(_odd_images(tmp_path)):
        (data / "train" / ("ants" if k % 2 else "bees")).mkdir(parents=True, exist_ok=True)
        f.rename(data / "train" / ("ants" if k % 2 else "bees") / f.name)
    assert _extract_vs_reference(data, tmp_path, resnet18_state_file, ("train",)) < 1e-5


def test_features_equal_the_float_pil_path_on_real_images(real_data, tmp_path, resnet18_state_file):
    import shutil

    data = tmp_path / "data"
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            dst = data / split / cls
            dst.mkdir(parents=True)
            for f in sorted((real_data / split / cls).glob("*.jpg"))[:2]:
                shutil.copy(f, dst / f.name)
    assert _extract_vs_reference(data, tmp_path, resnet18_state_file) < 1e-5


def test_cpu_features_do_not_depend_on_batch_size(tmp_path):
    data = make_dataset(tmp_path / "d", {"train": {"a": 4, "b": 3}, "val": {"a": 2, "b": 2}})
    caches = []
    for bs in (1, 3, 64):
        extract(ExtractConfig(str(data), str(tmp_path / f"{bs}.h5"), weights="none", workers=0, batch_size=bs))
        caches.append(read_cache(tmp_path / f"{bs}.h5"))
    for split in ("train", "val"):
        for other in caches[1:]:
            np.testing.assert_array_equal(caches[0].splits[split].features, other.splits[split].features)


def test_device_path_resizes_same_sized_images_as_one_batch_like_one_by_one():
    g = torch.Generator().manual_seed(0)
    imgs = [torch.randint(0, 256, s, dtype=torch.uint8, generator=g)
            for s in [(3, 375, 500), (3, 375, 500), (3, 500, 333), (3, 375, 500), (3, 30, 40)]]
    one_by_one = torch.stack([F.center_crop(F.resize(i, [256], antialias=True), [224, 224]) for i in imgs])
    assert torch.equal(resize_crop_tensors(imgs, Preprocess(decoder="torchvision")), one_by_one)


def test_raw_batch_travels_as_one_tensor_and_comes_back_whole(tmp_path):
    files = _odd_images(tmp_path)[:4]
    (tmp_path / "bad.jpg").write_text("<html>")
    paths = [str(f) for f in files] + [str(tmp_path / "bad.jpg")]
    items = [read_for_device(p) for p in paths]
    packed = collate_raw([(it, 0, 7 + i) for i, it in enumerate(items)])
    assert isinstance(packed.blob, torch.Tensor) and packed.blob.dtype == torch.uint8 and packed.start == 7
    assert [it.kind for it in items] == ["crop", "jpeg", "jpeg", "crop", ""]
    for a, b in zip(items, packed.items()):
        assert (a.kind, a.reason, a.path, a.pixels, a.sha256) == (b.kind, b.reason, b.path, b.pixels, b.sha256)
        assert a.payload is None and b.payload is None or torch.equal(a.payload, b.payload)
    x, reasons = decode_crops(packed.items(), torch.device("cpu"))
    assert x.shape == (4, 3, 224, 224) and reasons[:4] == [""] * 4 and "PIL cannot identify" in reasons[4]


def test_device_path_matches_the_pil_path_on_real_images(real_data):
    """The README's tolerance for --decoder torchvision on the CPU: features within 1e-3 relative L2."""
    files = sorted((real_data / "val/bees").glob("*.jpg"))[:6]
    model = _resnet()
    spec = Preprocess(decoder="torchvision")
    x_dev, reasons = decode_crops([read_for_device(str(f)) for f in files], torch.device("cpu"), spec)
    x_pil = torch.stack([uint8_transform()(load_rgb(f)) for f in files])
    with torch.no_grad():
        a, b = model(normalize_batch(x_pil, Preprocess())), model(normalize_batch(x_dev, spec))
    rel = ((a - b).norm(dim=1) / a.norm(dim=1)).max().item()
    assert reasons == [""] * len(files) and rel < 1e-3, rel


def _elongated(path, size=(20000, 2)):
    Image.fromarray(np.full((size[1], size[0], 3), (30, 140, 220), np.uint8)).save(path)
    return path


def test_elongated_image_costs_what_its_crop_costs(tmp_path):
    """A 20000 x 2 PNG: Resize(256) alone would build a 2,560,000 x 256 image (about 2 GB)."""
    f = _elongated(tmp_path / "wide.png")
    probe = (
        "import resource, sys, torch\n"
        "from pipeline.data import load_rgb, uint8_transform\n"
        "from pipeline.device_decode import decode_crops, read_for_device\n"
        "f = sys.argv[1]\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "x = uint8_transform()(load_rgb(f))\n"
        "y, r = decode_crops([read_for_device(f)], torch.device('cpu'))\n"
        "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
        "print(tuple(x.shape), tuple(y.shape), r, grown)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(f)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    grown_kib = int(out.stdout.split()[-1])
    assert out.stdout.startswith("(3, 224, 224) (1, 3, 224, 224) ['']"), out.stdout
    assert grown_kib < 64 * 1024, f"peak memory grew by {grown_kib} KiB"
    # the pixels are those of the image (a uniform colour stays that colour)
    assert uint8_transform()(load_rgb(f))[:, 100, 100].tolist() == [30, 140, 220]


def test_bounded_resize_is_the_same_pixels_up_to_rounding(tmp_path, monkeypatch, real_data):
    """The one-step (box) resize used for elongated images, forced on ordinary ones: at most 1 of 255 off."""
    files = _odd_images(tmp_path) + sorted((real_data / "train/ants").glob("*.jpg"))[:5]
    exact = [uint8_transform()(load_rgb(f)).int() for f in files]
    monkeypatch.setattr(pp, "MAX_ELONGATION", 0)
    assert Preprocess().bounded(500, 375)
    boxed = [uint8_transform()(load_rgb(f)).int() for f in files]
    diffs = torch.stack([(a - b).abs() for a, b in zip(exact, boxed)])
    assert diffs.max() <= 1 and diffs.float().mean() < 0.05, (diffs.max(), diffs.float().mean())


def test_elongated_images_extract_and_predict_without_traceback(tiny_data, tmp_path):
    from click.testing import CliRunner

    from cli import cli

    _elongated(tiny_data / "train/ants/wide.png")
    _elongated(tiny_data / "val/bees/tall.png", size=(1, 30000))
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(tiny_data), "--out", str(out), "--weights", "none", "--workers", "0",
                                 "--epochs", "1", "--no-plots"])
    assert r.exit_code == 0, r.output
    c = read_cache(out / "features.h5")
    assert "train/ants/wide.png" in c.splits["train"].paths and "val/bees/tall.png" in c.splits["val"].paths
    assert c.skipped == [] or all("wide" not in p and "tall" not in p for p, _ in c.skipped)
    r = CliRunner().invoke(cli, ["predict", str(out), str(tiny_data / "train/ants/wide.png"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["class"] in ("ants", "bees"), r.output


def test_device_path_through_worker_processes_equals_in_process(tiny_data, tmp_path):
    """RawBatch (one blob per batch) crosses the worker boundary intact: same features as workers=0."""
    for w in (0, 1):
        extract(ExtractConfig(str(tiny_data), str(tmp_path / f"w{w}.h5"), weights="none", workers=w, batch_size=4,
                              decoder="torchvision"))
    a, b = read_cache(tmp_path / "w0.h5"), read_cache(tmp_path / "w1.h5")
    for split in ("train", "val"):
        np.testing.assert_array_equal(a.splits[split].features, b.splits[split].features)
