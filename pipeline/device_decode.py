"""`extract --decoder torchvision`: JPEGs decoded by torchvision.io on the extraction device (nvJPEG on a
GPU, libjpeg-turbo on the CPU), resized, cropped and normalised there as tensors.

Workers only read bytes and check headers (and decode the odd non-JPEG file with PIL), so on a GPU
machine the CPU no longer caps throughput. A worker ships its batch as one uint8 tensor plus offsets
(one shared-memory handle per batch, not one per image). On the device, images of the same size are
resized and cropped as one batch, and the batch is normalised in one pass. Pixels differ slightly from
the PIL path (another decoder and resize implementation), so the choice is recorded in the fingerprint.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .data import BadImage, load_rgb, normalize_batch, pil_to_uint8, resize_crop_pil
from .preprocess import Preprocess

JPEG_MAGIC = b"\xff\xd8\xff"


def read_for_device(path: str, exif: bool = True) -> tuple[str, torch.Tensor | None, str]:
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
        img = load_rgb(path, exif=exif)  # PNG, BMP, ...: decoded here with the PIL rules (16-bit, alpha, EXIF)
        return "pixels", torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), ""
    except BadImage as e:
        return "", None, str(e)
    except Exception as e:  # a file that vanished, a header PIL cannot parse
        try:
            load_rgb(path)
        except BadImage as bad:
            return "", None, str(bad)
        return "", None, f"cannot read image: {e}"


def _decode(data, device: torch.device, exif: bool = True):
    from torchvision.io import ImageReadMode, decode_jpeg  # here: importing torchvision costs seconds

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=exif)


def _decode_all(datas: list[torch.Tensor], device: torch.device, exif: bool = True) -> list[torch.Tensor | str]:
    """One batched decode; when it fails, one at a time, so only the bad files are lost."""
    if not datas:
        return []
    try:
        return list(_decode(datas, device, exif))
    except Exception:
        out = []
        for d in datas:
            try:
                out.append(_decode(d, device, exif))
            except Exception as e:
                msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
                out.append(f"cannot decode image: {msg}")
        return out


def _bounded_crop(img: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """An absurdly elongated image (spec.bounded): the crop resampled from its source region by PIL on the
    CPU, as the PIL path does; a tensor resize would build the whole huge intermediate first."""
    pil = Image.fromarray(img.permute(1, 2, 0).cpu().numpy(), "RGB")
    return pil_to_uint8(resize_crop_pil(pil, spec)).to(img.device)


def resize_crop_tensors(images: list[torch.Tensor], spec: Preprocess) -> torch.Tensor:
    """3 x H x W uint8 images (any sizes, one device) -> N x 3 x crop x crop uint8, in order. Images of
    the same size are resized and cropped as one batch (one kernel per size, not per image)."""
    if not images:
        return torch.zeros(0, 3, spec.crop, spec.crop, dtype=torch.uint8)
    out = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(tuple(img.shape[-2:]), []).append(i)
    import torchvision.transforms.v2.functional as F  # here: importing torchvision costs seconds

    interp = {"bilinear": F.InterpolationMode.BILINEAR, "bicubic": F.InterpolationMode.BICUBIC}[spec.interpolation]
    for (h, w), idx in by_size.items():
        if spec.bounded(w, h):
            for i in idx:
                out[i] = _bounded_crop(images[i], spec)
            continue
        group = torch.stack([images[i] for i in idx])
        group = F.center_crop(F.resize(group, [spec.resize], interpolation=interp, antialias=spec.antialias),
                              [spec.crop, spec.crop])
        for k, i in enumerate(idx):
            out[i] = group[k]
    return torch.stack(out)


def decode_crops(items: list[tuple[str, torch.Tensor | None, str]], device: torch.device,
                 spec: Preprocess | None = None) -> tuple[torch.Tensor, list[str]]:
    """Decode the JPEGs of a batch on device (one batched call), resize and crop there.
    Returns (N_ok x 3 x crop x crop uint8 on device, reason per item: '' when used)."""
    spec = spec or Preprocess(decoder="torchvision")
    jpeg_pos = [i for i, (kind, _, _) in enumerate(items) if kind == "jpeg"]
    decoded = dict(zip(jpeg_pos, _decode_all([items[i][1] for i in jpeg_pos], device, spec.exif)))
    images, reasons = [], []
    for i, (kind, payload, reason) in enumerate(items):
        img = decoded.get(i) if kind == "jpeg" else (payload.to(device) if kind == "pixels" else reason)
        if isinstance(img, str):
            reasons.append(img)
            continue
        images.append(img)
        reasons.append("")
    x = resize_crop_tensors(images, spec)
    return x.to(device), reasons


def finish_batch(items: list[tuple[str, torch.Tensor | None, str]], device: torch.device,
                 spec: Preprocess | None = None) -> tuple[torch.Tensor, list[str]]:
    """decode_crops, then normalised: (N_ok x 3 x crop x crop float32 on device, reasons)."""
    x, reasons = decode_crops(items, device, spec)
    return normalize_batch(x, spec or Preprocess(decoder="torchvision")), reasons


class RawFiles(torch.utils.data.Dataset):
    """Key (group, i) -> (kind, payload, group, i, reason) of read_for_device; see ImageFiles."""

    def __init__(self, groups: list[tuple[list[str], list[str], int]], exif: bool = True):
        self.groups = groups
        self.exif = exif

    def __len__(self) -> int:
        return sum(len(g[0]) for g in self.groups)

    def __getitem__(self, key: tuple[int, int]):
        g, i = key
        kind, payload, reason = read_for_device(self.groups[g][0][i], self.exif)
        return kind, payload, g, i, reason


@dataclass
class RawBatch:
    """A batch of read_for_device items packed for the trip from a worker: every payload's bytes in one
    uint8 tensor (one shared-memory handle per batch), cut back apart by offsets in the main process."""

    group: int
    start: int
    blob: torch.Tensor  # uint8, the payloads end to end
    offsets: list[int]  # item k is blob[offsets[k]:offsets[k + 1]]
    kinds: list[str]  # 'jpeg' | 'pixels' | '' (unusable)
    shapes: list[tuple[int, ...] | None]  # a pixels payload's C x H x W
    reasons: list[str]

    def items(self) -> list[tuple[str, torch.Tensor | None, str]]:
        out = []
        for k, (kind, shape, reason) in enumerate(zip(self.kinds, self.shapes, self.reasons)):
            data = self.blob[self.offsets[k]:self.offsets[k + 1]] if kind else None
            out.append((kind, data.view(shape) if shape else data, reason))
        return out


def collate_raw(batch: list) -> RawBatch:
    """Pack a worker's items into one RawBatch (their sizes differ until decoded on the device)."""
    parts, offsets = [], [0]
    for kind, payload, _, _, _ in batch:
        flat = payload.reshape(-1) if kind else torch.zeros(0, dtype=torch.uint8)
        parts.append(flat)
        offsets.append(offsets[-1] + flat.numel())
    blob = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    return RawBatch(int(batch[0][2]), int(batch[0][3]), blob, offsets, [b[0] for b in batch],
                    [tuple(b[1].shape) if b[0] == "pixels" else None for b in batch], [b[4] for b in batch])
