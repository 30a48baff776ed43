"""`extract --decoder torchvision`: JPEGs decoded by torchvision.io on the extraction device (nvJPEG on a
GPU, libjpeg-turbo on the CPU), resized, cropped and normalised there as tensors.

Workers only read bytes and check headers (and decode the odd non-JPEG file with PIL), so on a GPU
machine the CPU no longer caps throughput. Pixels differ slightly from the PIL path (another decoder
and resize implementation), so the choice is recorded in the fingerprint.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .data import IMAGENET_MEAN, IMAGENET_STD, BadImage, load_rgb

JPEG_MAGIC = b"\xff\xd8\xff"


def read_for_device(path: str) -> tuple[str, torch.Tensor | None, str]:
    """('jpeg', file bytes) | ('pixels', uint8 CHW) | ('', None, reason). Headers only for JPEGs."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(3)
        if head == JPEG_MAGIC:
            with Image.open(path) as im, warnings.catch_warnings():  # header only: the bomb check
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                w, h = im.size
                if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                    raise BadImage(f"image too large, possible decompression bomb ({w}x{h} pixels > limit "
                                   f"{Image.MAX_IMAGE_PIXELS})")
            with open(path, "rb") as fh:
                return "jpeg", torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8), ""
        img = load_rgb(path)  # PNG, BMP, ...: decoded here with the PIL rules (16-bit, alpha, EXIF)
        return "pixels", torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), ""
    except BadImage as e:
        return "", None, str(e)
    except Exception as e:  # a file that vanished, a header PIL cannot parse
        try:
            load_rgb(path)
        except BadImage as bad:
            return "", None, str(bad)
        return "", None, f"cannot read image: {e}"


def _decode(data, device: torch.device):
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)


def _decode_all(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | str]:
    """One batched decode; when it fails, one at a time, so only the bad files are lost."""
    if not datas:
        return []
    try:
        return list(_decode(datas, device))
    except Exception:
        out = []
        for d in datas:
            try:
                out.append(_decode(d, device))
            except Exception as e:
                msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                out.append(f"cannot decode image: {msg}")
        return out


def finish_batch(items: list[tuple[str, torch.Tensor | None, str]], device: torch.device, resize: int = 256,
                 crop: int = 224) -> tuple[torch.Tensor, list[str]]:
    """Decode the JPEGs of a batch on device, then Resize/CenterCrop/Normalize every image there.
    Returns (N_ok x 3 x crop x crop float32 on device, reason per item: '' when used)."""
    jpeg_pos = [i for i, (kind, _, _) in enumerate(items) if kind == "jpeg"]
    decoded = dict(zip(jpeg_pos, _decode_all([items[i][1] for i in jpeg_pos], device)))
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    out, reasons = [], []
    for i, (kind, payload, reason) in enumerate(items):
        img = decoded.get(i) if kind == "jpeg" else (payload.to(device) if kind == "pixels" else reason)
        if isinstance(img, str):
            reasons.append(img)
            continue
        img = F.center_crop(F.resize(img, [resize], antialias=True), [crop, crop])
        out.append((img.float() / 255 - mean) / std)
        reasons.append("")
    x = torch.stack(out) if out else torch.zeros(0, 3, crop, crop, device=device)
    return x, reasons


class RawFiles(torch.utils.data.Dataset):
    """Key (group, i) -> (kind, payload, group, i, reason) of read_for_device; see ImageFiles."""

    def __init__(self, groups: list[tuple[list[str], list[str], int]]):
        self.groups = groups

    def __len__(self) -> int:
        return sum(len(g[0]) for g in self.groups)

    def __getitem__(self, key: tuple[int, int]):
        g, i = key
        kind, payload, reason = read_for_device(self.groups[g][0][i])
        return kind, payload, g, i, reason


def collate_raw(batch: list) -> list:
    """Keep the items as they are: their sizes differ until they are decoded on the device."""
    return batch
