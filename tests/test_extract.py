import json
import shutil

import h5py
import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision import datasets

from cache import CacheError, CacheLock, read_cache
from pipeline import PipelineError
from pipeline.backbones import BackboneSpec, build_backbone, imagenet_weights_path
from pipeline.data import eval_transform
from pipeline.extract import ExtractConfig, extract
from tests.conftest import make_dataset


def cfg(data, cache, **kw):
    kw.setdefault("weights", "none")
    kw.setdefault("workers", 0)
    kw.setdefault("batch_size", 4)
    return ExtractConfig(data_dir=str(data), cache=str(cache), **kw)


def torchvision_features(root, split, state_dict):
    """The reference: torchvision's own ResNet-18 forward, fc -> Identity, eval mode, ImageFolder order."""
    model = torchvision.models.resnet18(weights=None)
    model.load_state_dict(state_dict)
    model.fc = nn.Identity()
    model.eval()
    ds = datasets.ImageFolder(root / split, eval_transform())
    with torch.no_grad():
        feats = torch.cat([model(x[None]) for x, _ in ds]).numpy()
    return feats, [s[1] for s in ds.samples], [p for p, _ in ds.samples]


def test_features_equal_torchvision_forward(tiny_data, tmp_path, resnet18_state_file):
    cache = tmp_path / "f.h5"
    s = extract(cfg(tiny_data, cache, weights=str(resnet18_state_file), batch_size=4))
    assert s["rows"] == {"train": 6, "val": 4}
    c = read_cache(cache)
    sd = torch.load(resnet18_state_file, weights_only=True)
    for split in ("train", "val"):
        ref, labels, paths = torchvision_features(tiny_data, split, sd)
        got = c.splits[split]
        assert got.features.shape == (len(ref), 512)
        assert got.labels.tolist() == labels
        assert [str(tiny_data / p) for p in got.paths] == paths
        np.testing.assert_allclose(got.features, ref, rtol=1e-4, atol=1e-4)


def test_cache_schema(tiny_data, tmp_path):
    (tiny_data / "train/ants/readme.txt").write_text("not an image")
    cache = tmp_path / "f.h5"
    extract(cfg(tiny_data, cache, views=2))
    with h5py.File(cache, "r") as f:
        a = f.attrs
        assert a["format"] == "feature-cache/1" and bool(a["complete"]) is True
        assert json.loads(a["class_names"]) == ["ants", "bees"]
        assert a["backbone"] == "resnet18" and a["weights"] == "none" and a["precision"] == "fp32"
        assert int(a["feature_dim"]) == 512 and len(a["fingerprint"]) == 64
        assert json.loads(a["transform"])["exif_transpose"] is True
        tr = f["train"]
        assert tr["features"].dtype == np.float32 and tr["features"].shape == (6, 512)
        assert tr["features"].fletcher32 and tr["features"].chunks[1] == 512
        assert tr["views"].shape == (6, 2, 512) and tr["views"].dtype == np.float32
        assert tr["labels"].dtype == np.int64 and tr["labels"][...].tolist() == [0, 0, 0, 1, 1, 1]
        assert tr["paths"][0].decode() == "train/ants/img_000.jpg"
        assert "views" not in f["val"]
        sk = f["skipped"][...]
        assert [(p.decode(), r.decode()) for p, r in sk] == [("train/ants/readme.txt", "not an image extension (.txt)")]


def test_views_are_deterministic_and_differ_from_eval(tiny_data, tmp_path):
    extract(cfg(tiny_data, tmp_path / "a.h5", views=2, batch_size=4))
    extract(cfg(tiny_data, tmp_path / "b.h5", views=2, batch_size=5))
    a, b = read_cache(tmp_path / "a.h5"), read_cache(tmp_path / "b.h5")
    np.testing.assert_allclose(a.splits["train"].views, b.splits["train"].views, atol=1e-5)
    v = a.splits["train"].views
    assert not np.allclose(v[:, 0], v[:, 1])
    assert not np.allclose(v[:, 0], a.splits["train"].features)


def test_fingerprint_refusal_force_and_up_to_date(tiny_data, tmp_path):
    cache = tmp_path / "f.h5"
    extract(cfg(tiny_data, cache, seed=0))
    again = extract(cfg(tiny_data, cache, seed=0))
    assert again["up_to_date"] and again["computed"] == 0
    with pytest.raises(CacheError, match="was made with other settings .* pass --force"):
        extract(cfg(tiny_data, cache, seed=1))  # other random weights
    first = read_cache(cache).splits["train"].features
    s = extract(cfg(tiny_data, cache, seed=1, force=True))
    assert s["computed"] == 10
    assert not np.allclose(read_cache(cache).splits["train"].features, first)
    (tiny_data / "val/bees/img_001.jpg").unlink()  # a file was removed: the cache is updated, nothing decoded
    s = extract(cfg(tiny_data, cache, seed=1))
    assert s["computed"] == 0 and s["update"]["dropped"] == 1 and s["rows"] == {"train": 6, "val": 3}


def test_folder_that_only_gained_files_extracts_just_the_new_ones(tiny_data, tmp_path):
    cache = tmp_path / "f.h5"
    (tiny_data / "train/ants/broken.jpg").write_bytes(b"junk")
    extract(cfg(tiny_data, cache, views=2))
    make_dataset(tiny_data, {"train": {"ants": 5}})  # img_003, img_004 are new (img_000..002 rewritten equal); 7 train + 4 val reused
    s = extract(cfg(tiny_data, cache, views=2))
    assert s["reused"] == 11 and s["computed"] == 2 and s["rows"] == {"train": 8, "val": 4}
    assert "| reused 10 | new 2 |" in __import__("pipeline.extract", fromlist=["x"]).summary_line(s)
    extract(cfg(tiny_data, tmp_path / "fresh.h5", views=2))
    a, b = read_cache(cache), read_cache(tmp_path / "fresh.h5")
    assert a.splits["train"].paths == b.splits["train"].paths and a.skipped == b.skipped
    np.testing.assert_allclose(a.splits["train"].features, b.splits["train"].features, atol=1e-5)
    np.testing.assert_allclose(a.splits["train"].views, b.splits["train"].views, atol=1e-5)
    assert a.attrs["files_digest"] == b.attrs["files_digest"]


def test_second_extract_refused_while_locked(tiny_data, tmp_path):
    cache = tmp_path / "f.h5"
    with CacheLock(cache):
        with pytest.raises(CacheError, match=r"is locked by pid \d+"):
            extract(cfg(tiny_data, cache))
    assert not cache.exists()
    extract(cfg(tiny_data, cache))
    assert cache.exists() and not (tmp_path / "f.h5.lock").exists()


def test_resume_reuses_finished_batches(tiny_data, tmp_path, interrupt_second_batch):
    """An extract that dies after its first batch resumes without redoing it and equals a clean run."""
    cache = tmp_path / "f.h5"
    with pytest.raises(KeyboardInterrupt):
        extract(cfg(tiny_data, cache, batch_size=4))
    assert not cache.exists() and len(list((tmp_path / "f.h5.partial").glob("*.npz"))) == 1
    interrupt_second_batch()  # the real forward again
    s = extract(cfg(tiny_data, cache, batch_size=4))
    assert s["resumed"] == 4 and s["computed"] == 6
    extract(cfg(tiny_data, tmp_path / "clean.h5", batch_size=4))
    a, b = read_cache(cache), read_cache(tmp_path / "clean.h5")
    for split in ("train", "val"):
        np.testing.assert_array_equal(a.splits[split].features, b.splits[split].features)
        assert a.splits[split].paths == b.splits[split].paths
    assert not (tmp_path / "f.h5.partial").exists()


def test_imagenet_weights_from_torch_home(tiny_data, tmp_path, offline_torch_home, resnet18_state_file):
    expected = imagenet_weights_path("resnet18")
    assert expected == offline_torch_home / "hub/checkpoints/resnet18-f37072fd.pth"
    with pytest.raises(PipelineError) as e:
        build_backbone(BackboneSpec("resnet18", "imagenet"))
    msg = str(e.value)
    assert str(expected) in msg and "--weights PATH" in msg and "--weights none" in msg
    expected.parent.mkdir(parents=True)
    shutil.copy(resnet18_state_file, expected)
    extract(cfg(tiny_data, tmp_path / "in.h5", weights="imagenet"))
    extract(cfg(tiny_data, tmp_path / "path.h5", weights=str(resnet18_state_file)))
    a, b = read_cache(tmp_path / "in.h5"), read_cache(tmp_path / "path.h5")
    assert a.attrs["weights"] == "imagenet"
    assert a.attrs["fingerprint"] == b.attrs["fingerprint"]  # same content, same features
    np.testing.assert_array_equal(a.splits["val"].features, b.splits["val"].features)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return torch.flatten(self.pool(torch.relu(self.conv(x))), 1)


def test_exported_program_backbone(tiny_data, tmp_path):
    torch.manual_seed(0)
    net = TinyNet().eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    prog = torch.export.export(net, (torch.randn(2, 3, 224, 224),), dynamic_shapes={"x": {0: batch}})
    path = tmp_path / "tiny.pt2"
    torch.export.save(prog, str(path))
    extract(cfg(tiny_data, tmp_path / "p.h5", backbone=str(path)))
    c = read_cache(tmp_path / "p.h5")
    assert c.feature_dim == 8 and c.attrs["backbone"] == "tiny.pt2"
    ds = datasets.ImageFolder(tiny_data / "val", eval_transform())
    with torch.no_grad():
        ref = torch.cat([net(x[None]) for x, _ in ds]).numpy()
    np.testing.assert_allclose(c.splits["val"].features, ref, rtol=1e-5, atol=1e-5)


def test_bad_weights_file_messages(tmp_path):
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd.pop("layer1.0.conv1.weight")
    sd["conv1.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(PipelineError) as e:
        build_backbone(BackboneSpec("resnet18", str(tmp_path / "bad.pt")))
    assert "1 missing keys (first: layer1.0.conv1.weight)" in str(e.value)
    assert "1 wrong shapes (first: conv1.weight (1,) vs (64, 3, 7, 7))" in str(e.value)
    with pytest.raises(PipelineError, match="unknown backbone 'resnet19'"):
        build_backbone(BackboneSpec("resnet19", "none"))


def test_other_torchvision_architecture(tiny_data, tmp_path):
    extract(cfg(tiny_data, tmp_path / "m.h5", backbone="mobilenet_v3_small"))
    c = read_cache(tmp_path / "m.h5")
    assert c.splits["train"].features.shape == (6, 1024) and np.isfinite(c.splits["train"].features).all()


def test_torchvision_decoder_matches_the_pil_path(tiny_data, tmp_path):
    from PIL import Image

    Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(tiny_data / "train/ants/cmyk.jpg")
    Image.new("RGBA", (40, 30), (0, 0, 255, 128)).save(tiny_data / "train/bees/alpha.png")
    rot = Image.new("RGB", (40, 20), (250, 10, 10))
    rot.paste((10, 10, 250), (20, 0, 40, 20))  # not symmetric: the orientation shows in the features
    ex = rot.getexif()
    ex[0x0112] = 6
    rot.save(tiny_data / "val/ants/rotated.jpg", exif=ex.tobytes())
    good = (tiny_data / "train/ants/img_000.jpg").read_bytes()
    (tiny_data / "train/ants/truncated.jpg").write_bytes(good[: len(good) // 2])
    (tiny_data / "train/bees/page.jpg").write_text("<html></html>")
    extract(cfg(tiny_data, tmp_path / "pil.h5"))
    s = extract(cfg(tiny_data, tmp_path / "tv.h5", decoder="torchvision"))
    a, b = read_cache(tmp_path / "pil.h5"), read_cache(tmp_path / "tv.h5")
    assert a.attrs["fingerprint"] != b.attrs["fingerprint"] and b.attrs["decoder"] == "torchvision"
    assert [p for p, _ in b.skipped] == ["train/ants/truncated.jpg", "train/bees/page.jpg"]
    assert s["rows"] == {"train": 8, "val": 5}
    for split in ("train", "val"):
        assert a.splits[split].paths == b.splits[split].paths
        fa, fb = a.splits[split].features, b.splits[split].features
        rel = np.linalg.norm(fa - fb, axis=1) / np.linalg.norm(fa, axis=1)
        assert rel.max() < 0.02, rel  # another decoder and resize: close, not equal
    with pytest.raises(PipelineError, match="works without --views and --draft"):
        extract(cfg(tiny_data, tmp_path / "x.h5", decoder="torchvision", views=2))
