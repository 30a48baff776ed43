"""Fast JPEG decoding by default: the smallest DCT scale that keeps the short side >= 2 x resize.

Chosen scales around the margin, EXIF orientation, features and finetune crops close to the full
decode's, the spec / fingerprint / record round trip, old caches and runs read as exact, and extract,
finetune and predict following the spec.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cache import read_cache
from cli import cli
from pipeline import PipelineError
from pipeline.data import LabelledImages, full_size, load_rgb
from pipeline.extract import ExtractConfig, extract, feature_fields, preprocess_for
from pipeline.finetune import FinetuneConfig, _recipe, finetune_spec, recorded_recipe
from pipeline.predict import _decoder
from pipeline.preprocess import Preprocess, decode_hint, jpeg_draft

from conftest import real_data_dir

FAST = Preprocess(draft=2)
DESC = {"kind": "torchvision", "backbone": "resnet18", "weights_digest": "0" * 64}


def photo(path, size=(4032, 3024), seed=0, exif_orientation=None):
    """A phone-sized JPEG (quality 90) with real-looking content: one of the tutorial's photos upscaled when
    the data set is here, else a smooth gradient with noise."""
    real = real_data_dir()
    if real is not None:
        src = sorted((real / "train" / "ants").glob("*.jpg"))[seed]
        img = Image.open(src).convert("RGB").resize(size, Image.BICUBIC)
    else:
        rng = np.random.default_rng(seed)
        y, x = np.mgrid[0:48, 0:64] / 64.0
        small = np.stack([x * 255, y * 255, (1 - x) * 200], -1) + rng.normal(0, 30, (48, 64, 3))
        img = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize(size, Image.BICUBIC)
    exif = Image.Exif()
    if exif_orientation:
        exif[0x0112] = exif_orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90, exif=exif)
    return path


@pytest.mark.parametrize("size, fast, draft1x", [
    ((4032, 3024), (1008, 756), (504, 378)),  # 1/4 keeps 756 >= 512; the old --draft went to 1/8
    ((3024, 4032), (756, 1008), (378, 504)),
    ((2048, 1024), (1024, 512), (512, 256)),  # exactly 2 x 512 on the short side: 1/2
    ((2047, 1023), (2047, 1023), (1024, 512)),  # one pixel short of it: no draft
    ((1000, 800), (1000, 800), (500, 400)),  # below 2 x 512: decoded whole
])
def test_draft_scale_keeps_twice_the_resize_target(tmp_path, size, fast, draft1x):
    f = photo(tmp_path / "p.jpg", size)
    assert FAST.draft_size() == (512, 512) and Preprocess(draft=1).draft_size() == (256, 256)
    assert Preprocess().draft_size() is None
    assert load_rgb(f, draft=FAST.draft_size()).size == fast
    assert load_rgb(f, draft=Preprocess(draft=1).draft_size()).size == draft1x
    assert load_rgb(f).size == size


def test_png_is_never_drafted(tmp_path):
    f = tmp_path / "p.png"
    Image.open(photo(tmp_path / "p.jpg", (2048, 1536))).save(f)
    assert load_rgb(f, draft=FAST.draft_size()).size == (2048, 1536)


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_applied_after_the_draft_and_full_size_kept(tmp_path, orientation):
    f = photo(tmp_path / "p.jpg", exif_orientation=orientation)
    img = load_rgb(f, draft=FAST.draft_size())
    assert img.size == (756, 1008) and full_size(img) == (3024, 4032)  # portrait, as the phone meant it
    full = load_rgb(f).resize(img.size, Image.BILINEAR)
    diff = np.abs(np.asarray(img, np.float32) - np.asarray(full, np.float32)).mean()
    assert diff < 4.0  # the same picture the same way up (a wrong turn differs by tens of levels)
    wrong = img.transpose(Image.Transpose.ROTATE_180)
    assert np.abs(np.asarray(wrong, np.float32) - np.asarray(full, np.float32)).mean() > 4 * diff


def test_spec_fingerprint_and_record_round_trip():
    assert FAST.fingerprint_fields()["draft"] == 2
    # exact and the old --draft keep the booleans older caches were fingerprinted with
    assert Preprocess().fingerprint_fields()["draft"] is False
    assert Preprocess(draft=True).fingerprint_fields()["draft"] is True and Preprocess(draft=True).draft == 1
    fps = {json.dumps(feature_fields(DESC, "fp32", 0, 0, d), sort_keys=True) for d in (0, 1, 2)}
    assert len(fps) == 3
    assert Preprocess.from_record(FAST.record()) == FAST
    assert Preprocess.from_record(json.loads(json.dumps(FAST.record()))).draft == 2
    with pytest.raises(PipelineError, match="draft 9 is not an integer from 0 to 8"):
        Preprocess(draft=9)
    with pytest.raises(PipelineError, match="draft decoding exists in the pil decoder only"):
        Preprocess(draft=2, decoder="torchvision")


def test_old_records_read_as_what_they_were_made_with():
    old_exact, old_draft = Preprocess().record(), Preprocess(draft=1).record()
    old_exact["spec"]["draft"], old_draft["spec"]["draft"] = False, True  # as written before margins
    assert Preprocess.from_record(old_exact).draft == 0 and Preprocess.from_record(old_draft).draft == 1
    legacy = Preprocess().describe()  # caches from before the spec: description plus a draft attr
    assert Preprocess.from_record(legacy, False, "pil").draft == 0
    assert Preprocess.from_record(legacy, True, "pil").draft == 1
    assert Preprocess.from_record(None).draft == 0


def test_which_decode_each_setting_gives():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    cfg = ExtractConfig("d", "c.h5")
    assert preprocess_for(cfg, cpu) == FAST  # the default: fast on the pil decoder
    assert preprocess_for(cfg, cuda) == Preprocess(decoder="torchvision")  # full size, on the device
    assert preprocess_for(ExtractConfig("d", "c.h5", jpeg_decode="exact"), cpu).draft == 0
    assert preprocess_for(ExtractConfig("d", "c.h5", draft=True), cpu).draft == 1
    assert preprocess_for(ExtractConfig("d", "c.h5", jpeg_decode="fast"), cuda) == FAST  # asked for: pil
    assert preprocess_for(ExtractConfig("d", "c.h5", views=2), cuda) == FAST
    with pytest.raises(PipelineError, match="works without --views and --draft"):
        preprocess_for(ExtractConfig("d", "c.h5", decoder="torchvision", jpeg_decode="fast"), cpu)
    with pytest.raises(PipelineError, match="--draft is --jpeg-decode draft; it cannot go with --jpeg-decode exact"):
        preprocess_for(ExtractConfig("d", "c.h5", draft=True, jpeg_decode="exact"), cpu)
    assert jpeg_draft("auto", "pil") == 2 and jpeg_draft("auto", "torchvision") == 0
    assert finetune_spec(FinetuneConfig("d", "o")) == FAST
    assert finetune_spec(FinetuneConfig("d", "o", jpeg_decode="exact")) == Preprocess()
    assert "--jpeg-decode exact" in decode_hint(0, 2)


@pytest.fixture
def phone_data(tmp_path):
    """train/val x ants/bees, one 12 MP JPEG each (one of them turned by EXIF)."""
    root = tmp_path / "phone"
    for k, (split, cls) in enumerate([("train", "ants"), ("train", "bees"), ("val", "ants"), ("val", "bees")]):
        photo(root / split / cls / f"IMG_{k}.JPG", seed=k, exif_orientation=6 if k == 1 else None)
    return root


def _features(cache) -> np.ndarray:
    c = read_cache(cache)
    return np.concatenate([c.splits[s].features for s in ("train", "val")])


def test_fast_extract_features_close_to_the_full_decode(phone_data, tmp_path):
    fast, exact = tmp_path / "fast.h5", tmp_path / "exact.h5"
    extract(ExtractConfig(str(phone_data), str(fast), weights="none", workers=0))
    extract(ExtractConfig(str(phone_data), str(exact), weights="none", workers=0, jpeg_decode="exact"))
    a, b = _features(fast), _features(exact)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    assert rel.max() < 0.03 and rel.max() > 0  # close, and really decoded another way
    c = read_cache(fast)
    assert c.meta.fingerprint != read_cache(exact).meta.fingerprint
    assert Preprocess.from_record(c.meta.transform).draft == 2 and c.meta.draft is True
    stats = c.splits["train"].image_stats
    assert sorted(zip(stats["width"].tolist(), stats["height"].tolist())) == [(3024, 4032), (4032, 3024)]


def test_the_default_follows_an_existing_caches_decode_and_another_is_refused(phone_data, tmp_path):
    """A cache made before fast decoding was the default (exact) is updated as it was made by the default
    (auto), never mixed with fast rows and never refused; an explicit other decode is refused with why."""
    cache = tmp_path / "c.h5"
    base = ["extract", str(phone_data), "--cache", str(cache), "--weights", "none", "--workers", "0"]
    assert CliRunner().invoke(cli, base + ["--jpeg-decode", "exact"]).exit_code == 0  # as made before fast
    before = cache.read_bytes()
    r = CliRunner().invoke(cli, base)  # the default: up to date, exact as it was made
    assert r.exit_code == 0 and "already complete" in r.output and cache.read_bytes() == before, r.output
    r = CliRunner().invoke(cli, base + ["--jpeg-decode", "fast"])
    assert r.exit_code == 1 and cache.read_bytes() == before
    assert r.output.strip() == (
        f"Error: cache {cache}: its JPEGs were decoded with --jpeg-decode exact (caches made before fast became "
        "the default are exact), this extract uses fast: pass --jpeg-decode exact to add to it as it was made, "
        "or --force to rebuild it")
    r = CliRunner().invoke(cli, base + ["--weights", "none", "--seed", "1"])  # other settings: the general line
    assert r.exit_code == 1 and "made with other settings" in r.output and "--jpeg-decode" not in r.output
    fresh = tmp_path / "f.h5"
    assert CliRunner().invoke(cli, ["extract", str(phone_data), "--cache", str(fresh), "--weights", "none",
                                    "--workers", "0"]).exit_code == 0
    from cache import read_attrs

    assert read_attrs(fresh).fingerprint != read_attrs(cache).fingerprint  # a new cache: fast


def test_finetune_dataset_drafts_and_its_crops_stay_close(tmp_path):
    """RandomResizedCrop starts from the decoded image: from the 1/4-scale decode even its smallest crops
    (8% of the area) stay close to the full decode's."""
    from torchvision.transforms import functional as F

    f = photo(tmp_path / "p.jpg")
    ds = LabelledImages([str(f)], [0], lambda im: im.size, draft=FAST.draft_size())
    assert ds[0, 0] == ((1008, 756), 0)
    full, fast = load_rgb(f), load_rgb(f, draft=FAST.draft_size())
    for frac in (1.0, 0.5, 0.28):  # 0.28 x 0.28 = the smallest crop RandomResizedCrop draws
        w, h = int(4032 * frac), int(3024 * frac)
        left, top = (4032 - w) // 3, (3024 - h) // 2
        a = np.asarray(F.resized_crop(full, top, left, h, w, [224, 224]), np.float32)
        b = np.asarray(F.resized_crop(fast, top // 4, left // 4, h // 4, w // 4, [224, 224]), np.float32)
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.05, frac


def test_predict_decodes_as_the_spec_says(tmp_path):
    f = photo(tmp_path / "p.jpg")
    fast, _ = _decoder(FAST, torch.device("cpu"))([f])
    exact, _ = _decoder(Preprocess(), torch.device("cpu"))([f])
    again, _ = _decoder(Preprocess.from_record(json.loads(json.dumps(FAST.record()))), torch.device("cpu"))([f])
    assert torch.equal(fast, again) and not torch.equal(fast, exact)
    assert (fast - exact).abs().mean() < 0.05  # normalised units: the same picture


def test_finetune_and_predict_follow_the_spec(phone_data, tmp_path):
    """finetune records the fast decode it trained with; predict reads the run back with it, and a run whose
    record says exact (made before fast) is predicted with the full decode."""
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["finetune", str(phone_data), "--out", str(out), "--weights", "none", "--epochs", "1",
                                 "--workers", "0", "--no-plots"])
    assert r.exit_code == 0, r.output
    m = torch.load(out / "model.pt", weights_only=True)
    assert Preprocess.from_record(m["transform"], m["draft"], m["decoder"]).draft == 2 and m["draft"] is True
    assert m["recipe"]["jpeg_decode"] == "fast"
    img = phone_data / "val" / "ants" / "IMG_2.JPG"
    probs = {}
    for name, change in (("fast", None), ("exact", 0)):
        run = out
        if change is not None:  # the same run as made before fast: its record says full-size decode
            run = tmp_path / name
            run.mkdir()
            m2 = dict(m, transform=Preprocess().record(), draft=False)
            torch.save(m2, run / "model.pt")
        r = CliRunner().invoke(cli, ["predict", str(run), str(img), "--json"])
        assert r.exit_code == 0, r.output
        probs[name] = json.loads(r.stdout)[0]["probabilities"]
    gap = abs(probs["fast"]["ants"] - probs["exact"]["ants"])
    assert 1e-5 < gap < 0.05  # decoded another way, the same picture


def test_a_checkpoint_made_before_fast_resumes_only_as_exact():
    old = {k: v for k, v in _recipe(FinetuneConfig("d", "o")).items() if k != "jpeg_decode"}  # no such key then
    assert recorded_recipe(old) == _recipe(FinetuneConfig("d", "o", jpeg_decode="exact"))
    assert recorded_recipe(old) != _recipe(FinetuneConfig("d", "o"))  # the default (fast) is refused, by name
    assert _recipe(FinetuneConfig("d", "o"))["jpeg_decode"] == _recipe(FinetuneConfig("d", "o", jpeg_decode="fast"))[
        "jpeg_decode"] == "fast"
