"""Stages of the transfer-learning pipeline: data, backbones, extract, head, finetune, reports.

Importing the package is cheap (no torch): the CLI's --help and small commands start fast, and each
stage imports the heavy libraries it uses itself.
"""

MIN_TORCH = (2, 6)


class PipelineError(Exception):
    """A user-facing problem (bad input, bad usage); its message says what to do."""


def check_torch_version(version: str) -> None:
    """Refuse torch < 2.6: weights_only loading is only safe from there (CVE-2025-32434)."""
    major, minor = (int("".join(c for c in part if c.isdigit()) or 0) for part in version.split("+")[0].split(".")[:2])
    if (major, minor) < MIN_TORCH:
        raise ImportError(f"torch {version} is too old: this tool needs torch >= 2.6 (safe weights_only loading, "
                          "CVE-2025-32434); pip install 'torch>=2.6'")
