"""pipeline/resnet.py and the torchvision-free transforms are torchvision's, exactly: the same weights from
the same seed, the same outputs from the same weights, the same pixels from the same seeded draws."""
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

from pipeline.backbones import imagenet_weights_url
from pipeline.data import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform, view_transform
from pipeline.preprocess import Preprocess
from pipeline.resnet import ARCHS, resnet


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_native_resnet_is_torchvisions_network(arch):
    torch.manual_seed(7)
    ours = resnet(arch)
    after_ours = torch.rand(3)
    torch.manual_seed(7)
    ref = torchvision.models.get_model(arch, weights=None)
    assert torch.equal(torch.rand(3), after_ours)  # the same number of draws from the global RNG
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), ref.eval()(x))
        ours.train(), ref.train()
        assert torch.equal(ours(x), ref(x))  # training mode too (batch statistics)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_native_resnets_have_torchvisions_shapes_and_weights_files(arch):
    with torch.device("meta"):
        a, b = resnet(arch).state_dict(), torchvision.models.get_model(arch, weights=None).state_dict()
    assert {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}
    enum = torchvision.models.get_model_weights(arch)
    assert imagenet_weights_url(arch) == enum.IMAGENET1K_V1.url


def _photo(w: int, h: int, seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    base = g.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth-ish, like a photo
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


SIZES = [(500, 375), (375, 500), (224, 224), (256, 300), (1200, 90), (60, 900), (31, 17)]


def test_transforms_are_torchvisions_to_the_bit():
    train_ref = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    view_ref = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.PILToTensor()])
    eval_ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    flips = 0
    for k, (w, h) in enumerate(SIZES[:5]):
        img = _photo(w, h, k)
        assert torch.equal(eval_transform()(img), eval_ref(img))
        for seed in range(6):
            for ours, ref in ((train_transform(), train_ref), (view_transform(Preprocess()), view_ref)):
                torch.manual_seed(seed)
                x = ours(img)
                torch.manual_seed(seed)
                y = ref(img)
                assert x.dtype == y.dtype and torch.equal(x, y), (w, h, seed)
            torch.manual_seed(seed)
            T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
            flips += bool(torch.rand(1) < 0.5)
    assert 0 < flips < 30  # both branches of the flip were compared


def test_weights_load_onto_a_layout_and_old_files_without_batchnorm_counters_load(tmp_path):
    """With a weights file the network is laid out on the meta device (no random init to overwrite) and
    the file's tensors become its weights: the same features as loading into a built network, torch's RNG
    untouched, and files saved before BatchNorm had num_batches_tracked (torchvision's own) accepted."""
    from pipeline.backbones import BackboneSpec, build_backbone

    torch.manual_seed(5)
    ref = torchvision.models.resnet18()
    sd = ref.state_dict()
    new, old = tmp_path / "new.pth", tmp_path / "old.pth"
    torch.save(sd, new)
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, old)
    ref.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    state = torch.random.get_rng_state()
    for path in (new, old):
        bb = build_backbone(BackboneSpec("resnet18", str(path)))
        assert not any(t.is_meta for t in bb.module.state_dict().values())
        with torch.no_grad():
            assert torch.equal(bb.module(x), ref.eval()(x))
        assert bb.feature_dim == 512
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_half_precision_weights_file_gives_a_float32_network(tmp_path):
    """Loading onto the layout casts as a copying load does: a file saved with .half() (or as float64)
    gives float32 weights with the file's values, never a mixed-dtype network that fails on its input."""
    from pipeline.backbones import BackboneSpec, build_backbone

    torch.manual_seed(2)
    sd = resnet("resnet18").state_dict()
    for dtype in (torch.float16, torch.float64):
        path = tmp_path / f"{dtype}.pth"
        torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, path)
        bb = build_backbone(BackboneSpec("resnet18", str(path)))
        assert {p.dtype for p in bb.module.parameters()} == {torch.float32}
        w = bb.module.state_dict()["net.conv1.weight"]
        assert torch.equal(w, sd["conv1.weight"].to(dtype).float())
        assert bb.module(torch.rand(1, 3, 64, 64)).shape == (1, 512)
