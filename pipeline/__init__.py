"""Stages of the transfer-learning pipeline: data, backbones, extract, head, finetune, reports."""
import torch

MIN_TORCH = (2, 6)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


# weights_only=True became the default in 2.6 and CVE-2025-32434 affects older releases.
if _torch_version() < MIN_TORCH:
    raise ImportError(
        f"torch {torch.__version__} is too old: this tool needs torch >= 2.6 "
        "(safe weights_only loading); pip install 'torch>=2.6'"
    )


class PipelineError(Exception):
    """A user-facing problem (bad input, bad usage); its message says what to do."""
