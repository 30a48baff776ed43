"""`extract --decoder torchvision`: JPEGs decoded by torchvision's decode ops on the extraction device
(nvJPEG on a GPU, libjpeg-turbo on the CPU), resized, cropped and normalised there as tensors. The ops
are loaded from torchvision's image library without importing torchvision (image_ops).

Workers read each file's bytes once (hashing them for the cache's file record) and check the JPEG
header. A baseline JPEG the device decodes the same way as PIL is shipped as bytes; every other file
(EXIF-rotated, CMYK/YCCK, progressive, truncated, absurdly elongated, not a JPEG) is decoded and
cropped by the PIL path in the worker, so it gives the PIL path's pixels. A worker ships its batch as
one uint8 tensor plus offsets (one shared-memory handle per batch, not one per image).

On the device the JPEGs are decoded in chunks bounded by a pixel budget, on a stream of their own
(see DecodeStream: the batched CUDA decoder writes its outputs on a private stream that does not wait
for the caller's), images of the same size are resized and cropped as one batch, and the crops are
handed to the forward's stream. A file the device cannot decode is tried by PIL before it is skipped;
a decoder that fails as a whole (out of memory, no nvJPEG, a sticky CUDA error) stops the run with one
line (DeviceDecodeError) and leaves no per-file reason behind. Pixels differ slightly from the PIL path
(another decoder and resize implementation), so the choice is recorded in the fingerprint.
"""
from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from PIL import Image

from . import PipelineError
from .data import BadImage, load_rgb, pil_to_uint8, resize_crop_pil
from .preprocess import Preprocess

JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
EXIF_ORIENTATION = 0x0112
# Decoded pixels per device decode call (and per resized group): 2**27 pixels are 400 MB of uint8 and
# 1.6 GB as float32 inside the resize; a batch of 256 12-megapixel photos would be 9 GB and 37 GB.
DEVICE_PIXEL_BUDGET = 1 << 27
# Benchmarks only (gpu_first_checks.sh, the race check): synchronise the whole device before each
# decode, decoding in the main thread, instead of on the dedicated stream and a background thread; the
# features must be the same either way.
SYNC_EACH_DECODE = False


class DeviceDecodeError(PipelineError):
    """The device decoder failed as a whole (not one file's bitstream): the run stops, nothing is skipped."""


class RawItem(NamedTuple):
    """What a worker ships for one file."""

    kind: str  # 'jpeg': bytes for the device | 'crop': 3 x crop x crop uint8 made by the PIL path | '': unusable
    payload: torch.Tensor | None
    reason: str  # why unusable ('' otherwise)
    path: str = ""
    pixels: int = 0  # width x height of a 'jpeg' (its header): the pixel budget's unit
    sha256: str = ""  # of the bytes read ('' when the file could not be read)


def pil_route(im: Image.Image, data: bytes, spec: Preprocess) -> str:
    """Why a JPEG must take the PIL path instead of the device decoder ('' when it need not), from its
    header (im: opened, not decoded) and its bytes."""
    if spec.exif and im.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
        return "EXIF orientation"  # nvJPEG ignores it (torchvision applies it on the CPU only)
    if im.mode not in ("RGB", "L"):
        return f"{im.mode} colour"  # CMYK and YCCK: torchvision's own CUDA tests expect them to fail
    if im.info.get("progressive") or im.info.get("progression"):
        return "progressive"  # nvJPEG decodes these one at a time with a sync each
    if JPEG_EOI not in data[-32:]:
        return "no end marker"  # truncated: the PIL path reports it; a device decoder may fill in grey
    if spec.bounded(*im.size):
        return "elongated"  # the PIL path resamples the crop from its source region (bounded work)
    return ""


def pil_crop(path: str, spec: Preprocess) -> torch.Tensor:
    """The PIL path's 3 x crop x crop uint8 crop of a file (raises BadImage). A spec without antialias
    (device resize only) resizes the PIL-decoded pixels as the device does."""
    img = load_rgb(path, exif=spec.exif)
    if spec.antialias:
        return pil_to_uint8(resize_crop_pil(img, spec))
    return resize_crop_tensors([pil_to_uint8(img)], spec)[0]


def read_for_device(path: str, exif: bool = True, spec: Preprocess | None = None) -> RawItem:
    """One file as a worker ships it: JPEG bytes for the device, or the PIL path's crop, or a reason."""
    spec = spec or Preprocess(decoder="torchvision", exif=exif)
    digest = ""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        digest = hashlib.sha256(data).hexdigest()
        if data[:3] == JPEG_MAGIC:
            with Image.open(io.BytesIO(data)) as im, warnings.catch_warnings():  # header only: the bomb check
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                w, h = im.size
                if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                    raise BadImage(f"image too large, possible decompression bomb ({w}x{h} pixels > limit "
                                   f"{Image.MAX_IMAGE_PIXELS})")
                route = pil_route(im, data, spec)
            if not route:
                return RawItem("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8), "", path, w * h, digest)
        return RawItem("crop", pil_crop(path, spec), "", path, 0, digest)  # PNG, BMP, routed JPEGs: PIL's rules
    except BadImage as e:
        return RawItem("", None, str(e), path, 0, digest)
    except Exception as e:  # a file that vanished, a header PIL cannot parse
        try:
            load_rgb(path)
        except BadImage as bad:
            return RawItem("", None, str(bad), path, 0, digest)
        return RawItem("", None, f"cannot read image: {e}", path, 0, digest)


# --------------------------------------------------------------------------- the device side


RGB_MODE = 3  # torchvision's ImageReadMode.RGB
# the ops' signatures as torchvision 0.19-0.29 register them (argument names and types)
_OP_ARGS = {"decode_jpeg": ["data: Tensor", "mode: int", "apply_exif_orientation: bool"],
            "decode_jpegs_cuda": ["encoded_images: List[Tensor]", "mode: int", "device: Device"]}
_image_ops_loaded: bool | None = None


def image_ops() -> bool:
    """Load torchvision's image library (its decode ops) without importing torchvision, which pulls
    torch._dynamo (2-3 s, 10 s on a busy machine, per process). False where this torchvision lays it out
    otherwise or registers other signatures: the caller then imports torchvision.io."""
    global _image_ops_loaded
    if _image_ops_loaded is None:
        _image_ops_loaded = False
        try:
            import importlib.machinery
            import importlib.util
            from pathlib import Path

            folder = Path(importlib.util.find_spec("torchvision").submodule_search_locations[0])
            names = ("image_stable", "image")  # 0.29 ships the stable-ABI library, earlier ones image
            libs = [folder / (n + suffix) for n in names for suffix in importlib.machinery.EXTENSION_SUFFIXES]
            lib = next((p for p in libs if p.exists()), None)
            if lib is not None:
                torch.ops.load_library(str(lib))
                _image_ops_loaded = all(
                    [f"{a.name}: {a.type}" for a in getattr(torch.ops.image, op).default._schema.arguments] == args
                    for op, args in _OP_ARGS.items())
        except Exception:  # noqa: BLE001  (no torchvision, another layout: the import path decides)
            _image_ops_loaded = False
    return _image_ops_loaded


def _decode(datas: list[torch.Tensor], device: torch.device, exif: bool = True) -> list[torch.Tensor]:
    """One batched decode call (the op tests replace to simulate a device decoder): torchvision's ops,
    called as torchvision.io.decode_jpeg calls them (a test holds the two equal)."""
    if image_ops():
        if device.type == "cuda":
            return list(torch.ops.image.decode_jpegs_cuda(datas, RGB_MODE, device))
        return [torch.ops.image.decode_jpeg(d, RGB_MODE, exif) for d in datas]
    from torchvision.io import ImageReadMode, decode_jpeg  # importing torchvision costs seconds

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=exif))


def _machine_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the machine's, never one file's: they stop the run."""
    return tuple(e for e in (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", None), ImportError,
                             MemoryError) if e is not None)


_PROBE: bytes | None = None


def probe_jpeg() -> bytes:
    """A tiny baseline JPEG that any working decoder decodes: tells a broken decoder from bad files."""
    global _PROBE
    if _PROBE is None:
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 120, 40)).save(buf, "JPEG", quality=90)
        _PROBE = buf.getvalue()
    return _PROBE


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _stop(e: BaseException) -> DeviceDecodeError:
    return DeviceDecodeError(f"the device JPEG decoder failed as a whole ({_one_line(e)}); nothing was recorded for "
                             "this batch: fix the GPU setup or rerun with --decoder pil (finished batches are kept)")


def budget_chunks(pixels: list[int], budget: int) -> list[list[int]]:
    """Consecutive positions whose pixels add up to at most budget (an image over it alone)."""
    chunks, cur, total = [], [], 0
    for k, p in enumerate(pixels):
        if cur and total + p > budget:
            chunks.append(cur)
            cur, total = [], 0
        cur.append(k)
        total += p
    if cur:
        chunks.append(cur)
    return chunks


def _bounded_crop(img: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """An absurdly elongated image (spec.bounded): the crop resampled from its source region by PIL on the
    CPU, as the PIL path does; a tensor resize would build the whole huge intermediate first."""
    pil = Image.fromarray(img.permute(1, 2, 0).cpu().numpy(), "RGB")
    return pil_to_uint8(resize_crop_pil(pil, spec)).to(img.device)


def resize_crop_each(images: list[torch.Tensor], spec: Preprocess) -> list[torch.Tensor]:
    """3 x H x W uint8 images (any sizes, one device) -> their 3 x crop x crop uint8 crops, in order. Images
    of the same size are resized and cropped as one batch (one kernel per size, not per image), in groups
    of at most DEVICE_PIXEL_BUDGET source pixels (the float copy inside the resize is 4x that in bytes)."""
    out: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(tuple(img.shape[-2:]), []).append(i)
    for (h, w), idx in by_size.items():
        if spec.bounded(w, h):
            for i in idx:
                out[i] = _bounded_crop(images[i], spec)
            continue
        for chunk in budget_chunks([h * w] * len(idx), DEVICE_PIXEL_BUDGET):
            members = [idx[c] for c in chunk]
            group = resize_crop_group(torch.stack([images[i] for i in members]), spec)
            for k, i in enumerate(members):
                out[i] = group[k]
    return out


def _native_uint8_resize(device: torch.device, interpolation: str) -> bool:
    """Whether torchvision's Resize interpolates uint8 directly (else through float32 and round)."""
    if device.type != "cpu":
        return False
    if interpolation == "bicubic":
        return True
    import platform

    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resize_crop_group(x: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """N x 3 x H x W uint8 (one size) -> N x 3 x crop x crop uint8: torchvision's Resize(spec.resize) +
    CenterCrop(spec.crop) on uint8 tensors, the same ops in the same order (a test holds them equal),
    without importing torchvision."""
    h, w = x.shape[-2:]
    rw, rh = spec.resized_size(w, h)
    if (rh, rw) != (h, w):
        native = _native_uint8_resize(x.device, spec.interpolation)
        y = x if native else x.to(torch.float32)
        y = torch.nn.functional.interpolate(y, size=[rh, rw], mode=spec.interpolation, align_corners=False,
                                            antialias=spec.antialias)
        if not native:
            if spec.interpolation == "bicubic":
                y = y.clamp_(min=0, max=255)
            y = y.round_().to(torch.uint8)
        x = y
    left, top = spec.crop_offset(w, h)
    return x[..., top:top + spec.crop, left:left + spec.crop]


def resize_crop_tensors(images: list[torch.Tensor], spec: Preprocess) -> torch.Tensor:
    """3 x H x W uint8 images (any sizes, one device) -> N x 3 x crop x crop uint8, in order."""
    if not images:
        return torch.zeros(0, 3, spec.crop, spec.crop, dtype=torch.uint8)
    return torch.stack(resize_crop_each(images, spec))


class DecodeStream:
    """Where the device decode runs, and how its crops reach the forward.

    torchvision's batched CUDA decoder allocates its outputs on the caller's current stream and writes
    them on a private stream that does not wait for it. Decoding on the forward's stream would let it
    write into memory the previous forward freed but may still be reading. So the decode runs with a
    dedicated stream current: its allocations come only from blocks this stream used before, and a host
    synchronize of this stream (not of the forward) before each decode makes those idle. The crops it
    hands over are waited for by an event and marked used by the consuming stream (record_stream), so
    their memory is not reused before the forward has read them. On the CPU all of this is nothing."""

    def __init__(self, device: torch.device, cuda=None):
        self.device = device
        self.cuda = cuda if cuda is not None else (torch.cuda if device.type == "cuda" else None)
        self.stream = self.cuda.Stream(device) if self.cuda is not None else None

    def run(self, fn):
        """fn() with the decode stream current -> (its result, an event after its work, or None)."""
        if self.cuda is None:
            return fn(), None
        if SYNC_EACH_DECODE:
            self.cuda.synchronize(self.device)
            return fn(), None
        self.stream.synchronize()  # blocks freed by this stream's earlier work are idle from here on
        with self.cuda.device(self.device), self.cuda.stream(self.stream):
            out = fn()
            ready = self.cuda.Event()
            ready.record(self.stream)
        return out, ready

    def hand_over(self, x: torch.Tensor, ready) -> torch.Tensor:
        """x, safe to use on the calling thread's current stream (call it there, before using x)."""
        if ready is None or self.cuda is None:
            return x
        consumer = self.cuda.current_stream(self.device)
        consumer.wait_event(ready)
        x.record_stream(consumer)
        return x


@dataclass
class Decoded:
    """A decoded batch on its way to the forward: take() it on the consuming thread."""

    x: torch.Tensor  # N_ok x 3 x crop x crop uint8 on the device
    reasons: list[str]  # per item: '' when used
    ready: object
    stream: DecodeStream

    def take(self) -> torch.Tensor:
        return self.stream.hand_over(self.x, self.ready)


class DeviceDecoder:
    """Items of a batch -> their crops on the device (see the module's docstring)."""

    def __init__(self, device: torch.device, spec: Preprocess | None = None, stream: DecodeStream | None = None):
        self.device = torch.device(device)
        self.spec = spec or Preprocess(decoder="torchvision")
        self.stream = stream or DecodeStream(self.device)

    def __call__(self, items: list) -> Decoded:
        """Decode (on the decode stream; may run on a background thread)."""
        (x, reasons), ready = self.stream.run(lambda: self._crops(items))
        return Decoded(x, reasons, ready, self.stream)

    def _crops(self, items: list) -> tuple[torch.Tensor, list[str]]:
        items = [it if isinstance(it, RawItem) else RawItem(*it) for it in items]
        spec, n = self.spec, len(items)
        reasons = [it.reason for it in items]
        on_device: dict[int, torch.Tensor] = {}
        on_host = {k: it.payload for k, it in enumerate(items) if it.kind == "crop"}
        jpegs = [k for k, it in enumerate(items) if it.kind == "jpeg"]
        for chunk in budget_chunks([items[k].pixels for k in jpegs], DEVICE_PIXEL_BUDGET):
            ks = [jpegs[c] for c in chunk]
            decoded = self._decode_chunk([items[k].payload for k in ks])
            good = [(k, img) for k, img in zip(ks, decoded) if img is not None]
            for (k, _), crop in zip(good, resize_crop_each([img for _, img in good], spec)):
                on_device[k] = crop
            del decoded, good  # the full-size images of this chunk are freed before the next one
            for k in ks:
                if k not in on_device:  # the device could not decode it: the PIL path tries
                    try:
                        on_host[k] = pil_crop(items[k].path, spec)
                    except BadImage as e:
                        reasons[k] = str(e)
                    except Exception as e:  # noqa: BLE001  (no path: a direct caller's bytes)
                        reasons[k] = f"cannot decode image: {_one_line(e)}"
        if on_host:  # one copy for every crop the PIL path made
            keys = sorted(on_host)
            host = torch.stack([on_host[k] for k in keys])
            if self.device.type == "cuda":
                host = host.pin_memory()
            moved = host.to(self.device, non_blocking=True)
            on_device.update(zip(keys, moved.unbind(0)))
        for k in range(n):
            if k in on_device:
                reasons[k] = ""
            elif not reasons[k]:
                reasons[k] = "cannot decode image"
        ok = [on_device[k] for k in range(n) if k in on_device]
        x = torch.stack(ok) if ok else torch.zeros(0, 3, spec.crop, spec.crop, dtype=torch.uint8, device=self.device)
        return x, reasons

    def _decode_chunk(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """One batched decode; when it fails, one at a time (None: that file's bitstream failed). A machine
        error, or every file failing while the decoder cannot decode even a tiny probe JPEG, stops the run."""
        stop_on = _machine_errors()
        exif = self.spec.exif
        try:
            return list(_decode(datas, self.device, exif))
        except stop_on as e:
            raise _stop(e) from e
        except Exception as whole:  # noqa: BLE001  (a bad bitstream fails the whole batched call)
            out = []
            for d in datas:
                try:
                    out.append(_decode([d], self.device, exif)[0])
                except stop_on as e:
                    raise _stop(e) from e
                except Exception:  # noqa: BLE001
                    out.append(None)
            if all(o is None for o in out):
                try:
                    _decode([torch.frombuffer(bytearray(probe_jpeg()), dtype=torch.uint8)], self.device, exif)
                except Exception as e:  # noqa: BLE001
                    raise _stop(whole) from e
            return out


def decode_crops(items: list, device: torch.device, spec: Preprocess | None = None) -> tuple[torch.Tensor, list[str]]:
    """Decode a batch's items on device and crop them there, synchronously.
    Returns (N_ok x 3 x crop x crop uint8 on device, reason per item: '' when used)."""
    dec = DeviceDecoder(device, spec)(items)
    return dec.take(), dec.reasons


def finish_batch(items: list, device: torch.device, spec: Preprocess | None = None) -> tuple[torch.Tensor, list[str]]:
    """decode_crops, then normalised: (N_ok x 3 x crop x crop float32 on device, reasons)."""
    from .data import normalize_batch

    x, reasons = decode_crops(items, device, spec)
    return normalize_batch(x, spec or Preprocess(decoder="torchvision")), reasons


class RawFiles(torch.utils.data.Dataset):
    """Key (group, i) -> (RawItem, group, i) of read_for_device; see ImageFiles."""

    def __init__(self, groups: list[tuple[list[str], list[str], int]], spec: Preprocess | bool | None = None):
        self.groups = groups
        if not isinstance(spec, Preprocess):  # older callers passed exif
            spec = Preprocess(decoder="torchvision", exif=True if spec is None else bool(spec))
        self.spec = spec

    def __len__(self) -> int:
        return sum(len(g[0]) for g in self.groups)

    def __getitem__(self, key: tuple[int, int]):
        g, i = key
        return read_for_device(self.groups[g][0][i], self.spec.exif, self.spec), g, i


@dataclass
class RawBatch:
    """A batch of read_for_device items packed for the trip from a worker: every payload's bytes in one
    uint8 tensor (one shared-memory handle per batch), cut back apart by offsets in the main process."""

    group: int
    start: int
    blob: torch.Tensor  # uint8, the payloads end to end
    offsets: list[int]  # item k is blob[offsets[k]:offsets[k + 1]]
    kinds: list[str]  # 'jpeg' | 'crop' | '' (unusable)
    shapes: list[tuple[int, ...] | None]  # a crop's C x H x W
    reasons: list[str]
    paths: list[str]
    pixels: list[int]
    digests: list[str]  # sha256 of the bytes the worker read

    def items(self) -> list[RawItem]:
        out = []
        for k, (kind, shape) in enumerate(zip(self.kinds, self.shapes)):
            data = self.blob[self.offsets[k]:self.offsets[k + 1]] if kind else None
            out.append(RawItem(kind, data.view(shape) if shape else data, self.reasons[k], self.paths[k],
                               self.pixels[k], self.digests[k]))
        return out


def collate_raw(batch: list) -> RawBatch:
    """Pack a worker's items into one RawBatch (their sizes differ until decoded on the device)."""
    parts, offsets = [], [0]
    for item, _, _ in batch:
        flat = item.payload.reshape(-1) if item.kind else torch.zeros(0, dtype=torch.uint8)
        parts.append(flat)
        offsets.append(offsets[-1] + flat.numel())
    blob = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8)
    items = [b[0] for b in batch]
    return RawBatch(int(batch[0][1]), int(batch[0][2]), blob, offsets, [it.kind for it in items],
                    [tuple(it.payload.shape) if it.kind == "crop" else None for it in items],
                    [it.reason for it in items], [it.path for it in items], [it.pixels for it in items],
                    [it.sha256 for it in items])
