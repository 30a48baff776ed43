"""Per-image measures for the audit's "photos not worth training on", taken by the decode workers at extract
time (they already hold the decoded image) and stored as one small record per cached row.

Everything but the size is measured on the centre crop the worker makes for the backbone anyway (every
second pixel): the cost stays a small fraction of the decode, and the blur measure is taken at one scale
for every photo (Resize gives each the same short side).
numpy and PIL only: imported by the decode workers and by the cache's schema.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# The record's fields, in order (float32 each; a row that was not measured is all NaN):
#   width, height   pixels of the decoded image (EXIF orientation applied)
#   bright_p05/50/95  percentiles of the luminance (0 black .. 1 white)
#   clipped         fraction of pixels at full white (luminance >= 250/255): blown-out highlights
#   blur            variance of the Laplacian of the luminance, divided by its variance (contrast-free:
#                   a sharp photo has much of its variance in fine detail, a blurred one almost none)
#   entropy         Shannon entropy of the luminance histogram, bits (0 .. 8)
#   colour          mean over pixels of max(R,G,B) - min(R,G,B), 0 .. 1 (0: grayscale)
FIELDS = ("width", "height", "bright_p05", "bright_p50", "bright_p95", "clipped", "blur", "entropy", "colour")
DTYPE = np.dtype([(f, np.float32) for f in FIELDS])


def unmeasured(n: int) -> np.ndarray:
    """n records of rows without measures (an older extract, or the device decode path)."""
    out = np.zeros(n, DTYPE)
    for f in FIELDS:
        out[f] = np.nan
    return out


def unmeasured_row() -> np.ndarray:
    """The (len(FIELDS),) float32 measures of a row that has none."""
    return np.full(len(FIELDS), np.nan, np.float32)


def measure(img: Image.Image, crop: np.ndarray) -> np.ndarray:
    """(len(FIELDS),) float32 measures of a decoded image: its size, and the rest measured on crop, the
    3 x H x W uint8 centre crop the worker already made for the backbone (what the model sees, at one scale
    for every photo: Resize gives every image the same short side), every second pixel of it."""
    w, h = img.size
    a = np.asarray(crop)[:, ::2, ::2].astype(np.int32)  # (3, h', w')
    lum = (a[0] * 299 + a[1] * 587 + a[2] * 114 + 500) // 1000  # 0..255, as PIL's convert("L")
    hist = np.bincount(lum.ravel(), minlength=256)
    n = lum.size
    cdf = np.cumsum(hist)
    p05, p50, p95 = (np.searchsorted(cdf, q * n) / 255.0 for q in (0.05, 0.5, 0.95))
    f = lum.astype(np.float32) * (1.0 / 255.0)
    lap = f[:-2, 1:-1] + f[2:, 1:-1] + f[1:-1, :-2] + f[1:-1, 2:] - 4.0 * f[1:-1, 1:-1]
    var = float(f.var())
    blur = float(lap.var()) / var if var > 1e-8 and lap.size else 0.0
    p = hist[hist > 0] / n
    entropy = float(-(p * np.log2(p)).sum())
    colour = float((a.max(0) - a.min(0)).mean()) / 255.0
    clipped = float(hist[250:].sum()) / n
    return np.array([w, h, p05, p50, p95, clipped, blur, entropy, colour], np.float32)


def as_records(rows: np.ndarray) -> np.ndarray:
    """(N, len(FIELDS)) float32 -> (N,) records of DTYPE."""
    rows = np.asarray(rows, np.float32).reshape(-1, len(FIELDS))
    out = np.zeros(len(rows), DTYPE)
    for k, f in enumerate(FIELDS):
        out[f] = rows[:, k]
    return out


def as_rows(records: np.ndarray) -> np.ndarray:
    """(N,) records -> (N, len(FIELDS)) float32."""
    return np.stack([np.asarray(records[f], np.float32) for f in FIELDS], 1) if len(records) else \
        np.zeros((0, len(FIELDS)), np.float32)
