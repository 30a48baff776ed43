"""HEIC/HEIF photos (the iPhone's default) through pillow-heif, a Pillow plugin; AVIF through Pillow's
own plugin (Pillow 11.3+). Torch-free, imported by every decode path (extract, finetune, predict, the
pictures); pillow-heif itself is imported on the first decode, never at startup.

libheif applies a HEIC file's rotation and mirror boxes while decoding and pillow-heif then sets the EXIF
orientation it hands Pillow to 1, so ImageOps.exif_transpose after it turns nothing twice: a HEIC photo
comes out upright as a JPEG with the same orientation tag does.
"""
from __future__ import annotations

import functools

HEIF_EXTENSIONS = (".heic", ".heif", ".hif")
AVIF_EXTENSIONS = (".avif",)


@functools.cache
def register_heif() -> bool:
    """Register pillow-heif's opener with Pillow once per process; False when pillow-heif is missing."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        return False
    register_heif_opener()
    return True


def missing_decoder(suffix: str) -> str:
    """Why a file of this suffix cannot be decoded here ('' when it can)."""
    if suffix.lower() in HEIF_EXTENSIONS and not register_heif():
        return "HEIC/HEIF needs pillow-heif (pip install pillow-heif)"
    return ""
