"""Device and precision, decided once and passed down (no branches inside loops)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from typing import TYPE_CHECKING

from . import PipelineError

if TYPE_CHECKING:
    import torch

# torch is imported where it is used, so the CLI can read these without paying for it
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16

    def autocast(self):
        """The context a forward pass runs under: autocast for bf16/fp16, nothing for fp32."""
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[self.precision])

    @property
    def memory_format(self) -> torch.memory_format:
        import torch

        # channels_last is faster for convolutions on both CPU (oneDNN) and CUDA (cuDNN)
        return torch.channels_last

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"


def resolve_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise PipelineError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def resolve_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    dev = resolve_device(device)
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        # fp32 is exact and the CPU default; bf16 autocast is the fast, safe choice on a GPU
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise PipelineError("fp16 autocast is not supported on the CPU; use --precision bf16 or fp32")
    return Runtime(dev, precision)


def default_workers() -> int:
    """DataLoader workers: enough to keep the model busy, never more than the cores."""
    return max(1, min(8, (os.cpu_count() or 2)))
