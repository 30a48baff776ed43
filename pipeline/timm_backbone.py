"""`--backbone timm:NAME`: a model timm builds (ViT, DINOv2, CLIP, ConvNeXt, EfficientNet ...; NAME may carry
a pretrained tag: vit_small_patch14_dinov2.lvd142m). The `timm` extra, imported only here (timm imports
torchvision, which costs seconds).

Features are timm's pooled pre-logits, `forward_head(forward_features(x), pre_logits=True)`; the
preprocessing is the model's own data config (timm.data.resolve_model_data_config: input size,
interpolation, crop_pct, mean, std) as a Preprocess: resize = floor(size / crop_pct), as timm's eval
transform does. Weights: imagenet = timm's pretrained file from the local Hugging Face hub cache, PATH = a
local .safetensors or .pth state_dict of the model, none = random init from the seed. Every file is read
without pickle (safetensors, or torch.load(weights_only=True)).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from pathlib import Path

import torch
from torch import nn

from . import PipelineError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm's hub repos hold, in timm's order


class MissingTimm(PipelineError):
    """--backbone timm:NAME without timm installed."""


def _timm():
    try:
        import timm
    except ImportError:
        raise MissingTimm("--backbone timm:NAME needs timm: pip install 'tlearn[timm]' (or pip install timm)") from None
    return timm


def network(name: str, meta: bool = False) -> nn.Module:
    """timm's model NAME with its own classifier, randomly initialised from torch's global RNG (meta: laid
    out on the meta device, for weights to be assigned); unknown names are one line."""
    timm = _timm()
    try:
        with torch.device("meta") if meta else contextlib.nullcontext():
            return timm.create_model(name, pretrained=False)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
            raise PipelineError(f"timm has no model {name!r} (timm.list_models('*vit*') lists them): "
                                f"{str(e).splitlines()[0][:160]}") from None
        raise


def classifier_name(model: nn.Module) -> str:
    """The qualified name of the model's classifier (its pretrained_cfg says: head, head.fc, classifier ...).
    It may be an Identity (DINOv2's default has no classes): then the weights have nothing to skip, and
    never a Linear inside the network is taken for it."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(name, str) and _get(model, name) is not None:
        return name
    from .backbones import last_linear_name

    return last_linear_name(model)


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


@functools.lru_cache(maxsize=16)
def preset(name: str) -> dict:
    """The model's eval preprocessing as Preprocess fields, from timm's resolve_model_data_config."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(network(name, meta=True))
    _, h, w = cfg["input_size"]
    if h != w or cfg.get("crop_mode", "center") != "center":
        raise PipelineError(f"timm model {name} takes a {h} x {w} {cfg.get('crop_mode')} crop; this tlearn makes "
                            "square centre crops only")
    if cfg["interpolation"] not in ("bilinear", "bicubic"):
        raise PipelineError(f"timm model {name} resizes with {cfg['interpolation']}; this tlearn resizes "
                            "bilinear or bicubic")
    return {"resize": math.floor(h / cfg["crop_pct"]), "crop": int(h), "interpolation": cfg["interpolation"],
            "mean": tuple(float(v) for v in cfg["mean"]), "std": tuple(float(v) for v in cfg["std"])}


def hub_weights_file(name: str) -> Path:
    """timm's pretrained file of NAME in the local Hugging Face hub cache; offline (or when it cannot be
    downloaded) one line naming the repository, the file and the cache folder."""
    model = network(name, meta=True)
    repo = (model.pretrained_cfg or {}).get("hf_hub_id")
    if not repo:
        raise PipelineError(f"timm has no hub weights for {name}; use --weights PATH (.safetensors or .pth) or none")
    from huggingface_hub import constants, try_to_load_from_cache

    for filename in WEIGHT_FILES:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    from .backbones import OFFLINE_ENV

    where = f"{constants.HF_HUB_CACHE}/models--{repo.replace('/', '--')}/snapshots/<revision>/{WEIGHT_FILES[0]}"
    hint = (f"timm's pretrained weights for {name} ({repo}: {WEIGHT_FILES[0]}) are not in the Hugging Face cache "
            f"({where})")
    if os.environ.get(OFFLINE_ENV) == "1" or constants.HF_HUB_OFFLINE:
        why = f"{OFFLINE_ENV}=1" if os.environ.get(OFFLINE_ENV) == "1" else "HF_HUB_OFFLINE=1"
        raise PipelineError(f"{hint} and {why}; fetch them where there is network "
                            f"(huggingface-cli download {repo}) and copy the cache there, or use --weights PATH or none")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, WEIGHT_FILES[0]))
    except Exception as e:  # no network is normal here
        raise PipelineError(f"{hint} and could not be downloaded ({type(e).__name__}); copy them there, or use "
                            "--weights PATH or none") from None


def build(name: str, weights: str, seed: int) -> tuple[nn.Module, str, str]:
    """(timm's model with the weights, its classifier's name, the weights' content hash without the
    classifier). weights: imagenet | none | PATH."""
    from .backbones import load_state_dict_file, load_weights_into, state_dict_digest

    with torch.random.fork_rng(devices=[]):  # random init (and the unused classifier) from the seed
        torch.manual_seed(seed)
        model = network(name)
    head = classifier_name(model)
    if weights == "none":
        sd = {k: v for k, v in model.state_dict().items() if not k.startswith(head + ".")}
    else:
        path = hub_weights_file(name) if weights == "imagenet" else Path(weights)
        sd = load_weights_into(model, load_state_dict_file(path), str(path), head)
    return model, head, state_dict_digest(sd)


def feature_dim(model: nn.Module) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


class TimmFeatures(nn.Module):
    """Normalised crops -> timm's pooled pre-logits: forward_head(forward_features(x), pre_logits=True)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.net = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(self.net.forward_features(x), pre_logits=True)


def reset_for(model: nn.Module, classes: int, seed: int) -> None:
    """finetune: a new classifier of `classes` outputs, the timm way (reset_classifier), its init seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.reset_classifier(classes)
