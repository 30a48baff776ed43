"""One typed preprocessing spec: what turns an image file into the backbone's input.

`Preprocess` is the single source of truth: the PIL path (pipeline.data), the device path
(pipeline.device_decode), the fingerprint of a cache and the record in a cache / model.pt are all built
from it, and `predict` rebuilds it from that record. Torch-free (the CLI may read it cheaply); the
transforms that need torch live beside the code that runs them and take a spec.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from . import PipelineError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")  # both exist in PIL and in torchvision's tensor resize
DECODERS = ("pil", "torchvision")  # what a spec records: the decoder actually used ("auto" is resolved first)
# --jpeg-decode: the spec's `draft` margin of each mode. fast (the pil decoder's default): libjpeg decodes at
# the smallest DCT scale (1/2, 1/4, 1/8) that keeps the short side >= 2 x resize, then Resize as always;
# draft: the old --draft, >= 1 x resize; exact: the full-size decode.
JPEG_DECODES = {"fast": 2, "draft": 1, "exact": 0}
MAX_DRAFT = 8
# Resize then CenterCrop, as two steps, while the resized image's long side is at most this many times
# `resize`; beyond it one bounded step (see Preprocess.bounded), so a 20000 x 2 image costs what its
# 224 x 224 output costs instead of a 2.56-million-pixel-wide intermediate.
MAX_ELONGATION = 50


@dataclass(frozen=True)
class Preprocess:
    """Eval preprocessing of the tutorial by default: Resize 256 (bilinear, antialiased), CenterCrop 224,
    [0, 1] floats normalised by the ImageNet mean/std, EXIF orientation applied, PIL decoding."""

    resize: int = 256  # the short side after resizing
    crop: int = 224  # the centre square kept
    interpolation: str = "bilinear"
    antialias: bool = True  # PIL always antialiases; only the tensor (device) path can turn it off
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    exif: bool = True  # apply the EXIF orientation tag
    # JPEGs decoded at the smallest DCT scale that keeps the short side >= draft x resize (PIL path);
    # 0: full-size decode. Records made before it carry False (0) or True (1: the old --draft).
    draft: int = 0
    decoder: str = "pil"  # pil: CPU workers | torchvision: JPEGs decoded on the extraction device

    def __post_init__(self):
        # JSON gives lists; a frozen spec is hashable and compares equal to the one it was saved from
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        problems = []
        if isinstance(self.draft, int) and 0 <= self.draft <= MAX_DRAFT:
            object.__setattr__(self, "draft", int(self.draft))  # True/False of older records: 1/0
        else:
            problems.append(f"draft {self.draft!r} is not an integer from 0 to {MAX_DRAFT}")
        if not (isinstance(self.crop, int) and isinstance(self.resize, int) and 0 < self.crop <= self.resize):
            problems.append(f"need 0 < crop <= resize (integers), got resize {self.resize!r} crop {self.crop!r}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            problems.append("mean and std need 3 values each, std > 0")
        if self.decoder not in DECODERS:
            problems.append(f"decoder {self.decoder!r} is not one of {', '.join(DECODERS)}")
        if not self.antialias and self.decoder == "pil":
            problems.append("the pil decoder always antialiases; antialias=False needs the torchvision decoder")
        if self.draft and self.decoder != "pil":
            problems.append("draft decoding exists in the pil decoder only")
        if problems:
            raise PipelineError("bad preprocessing spec: " + "; ".join(problems))

    # ------------------------------------------------------------------ geometry (pure)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after Resize(resize): torchvision's rule for an int size (short side = resize)."""
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def crop_offset(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centre crop in the resized image: torchvision's CenterCrop rule."""
        rw, rh = self.resized_size(width, height)
        return int(round((rw - self.crop) / 2.0)), int(round((rh - self.crop) / 2.0))

    def source_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region of the source image that becomes the crop, in source pixels (left, top, right, bottom)."""
        rw, rh = self.resized_size(width, height)
        left, top = self.crop_offset(width, height)
        sx, sy = width / rw, height / rh
        return left * sx, top * sy, (left + self.crop) * sx, (top + self.crop) * sy

    def bounded(self, width: int, height: int) -> bool:
        """True when Resize would build an absurdly elongated intermediate (long side > MAX_ELONGATION x
        resize): then the crop is resampled straight from its source region in one step. The result
        differs from the two-step one by at most 1 of 255 in a pixel (the filter's centres are computed
        from another origin), and images this elongated could not be processed before at all."""
        return max(self.resized_size(width, height)) > MAX_ELONGATION * self.resize

    def draft_size(self) -> tuple[int, int] | None:
        """The size hint of PIL's Image.draft, or None (full decode). PIL picks the largest scale 1/s
        (s in 8, 4, 2) with s <= min(width // hint, height // hint): the short side stays >= draft x resize,
        whichever way EXIF turns the photo afterwards."""
        return (self.draft * self.resize,) * 2 if self.draft else None

    # ------------------------------------------------------------------ records

    def describe(self) -> dict:
        """The `transform` field of the fingerprint. For the default spec this is, key for key, the
        description caches were fingerprinted with before the spec existed, so they stay valid."""
        norm = "imagenet" if (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD) else \
            f"mean={list(self.mean)}, std={list(self.std)}"
        aa = ", antialias" if self.antialias else ""
        return {
            "eval": f"Resize({self.resize}, {self.interpolation}{aa}) CenterCrop({self.crop}) ToTensor Normalize({norm})",
            "views": f"RandomResizedCrop({self.crop}, scale=(0.08,1), ratio=(3/4,4/3)) RandomHorizontalFlip "
                     f"ToTensor Normalize({norm})",
            "mean": list(self.mean),
            "std": list(self.std),
            "exif_transpose": self.exif,
            "rgb": "16-bit scaled to 8, alpha over white",
        }

    def fingerprint_fields(self) -> dict:
        """What of the spec changes a feature, as fields of the cache fingerprint (draft and decoder were
        separate fields before; decoder is absent for pil so that older caches keep their fingerprint).
        The torchvision decoder's value carries a revision: since its odd JPEGs (EXIF-rotated, CMYK,
        progressive) and PNGs take PIL's resize, an older cache of it is rebuilt rather than mixed."""
        # 0 and 1 as the booleans older caches were fingerprinted with
        return {"transform": self.describe(), "draft": bool(self.draft) if self.draft < 2 else self.draft,
                **({"decoder": f"{self.decoder}/2"} if self.decoder != "pil" else {})}

    def to_json(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def record(self) -> dict:
        """The cache's `transform` attr (and model.pt's): the description plus the spec itself."""
        return {**self.describe(), "spec": self.to_json()}

    @classmethod
    def from_json(cls, d: dict) -> "Preprocess":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PipelineError(f"preprocessing spec has unknown fields {', '.join(unknown)}; this tlearn is "
                                "older than the one that wrote it")
        return cls(**d)

    @classmethod
    def from_record(cls, transform: dict | None, draft: bool = False, decoder: str = "pil") -> "Preprocess":
        """The spec a cache or run was made with: its `spec` when recorded, else (caches made before the
        spec existed) the default one, with draft and decoder taken from their own attrs."""
        if isinstance(transform, dict) and isinstance(transform.get("spec"), dict):
            return cls.from_json(transform["spec"])
        legacy = cls(draft=int(bool(draft)), decoder=decoder or "pil")
        if transform is not None and transform != legacy.describe():
            raise PipelineError("the recorded preprocessing is not one this tlearn knows; rebuild the cache with "
                                "`extract --force` (and retrain) to record it again")
        return legacy


def resolve_decoder(name: str, device_type: str, views: int = 0, draft: bool = False) -> str:
    """The decoder a run uses: `auto` is torchvision (JPEGs decoded on the GPU) on CUDA when nothing
    needs the PIL path (views, a draft decode asked for by name), else pil."""
    if name not in ("auto",) + DECODERS:
        raise PipelineError(f"unknown decoder {name!r}: use auto, pil or torchvision")
    if name == "torchvision" and (views or draft):
        raise PipelineError("--decoder torchvision works without --views and --draft (or --jpeg-decode fast): it "
                            "decodes full size on the device; use the pil decoder for those")
    if name == "auto":
        return "torchvision" if device_type == "cuda" and not views and not draft else "pil"
    return name


def jpeg_draft(mode: str, decoder: str) -> int:
    """The spec's draft margin for --jpeg-decode mode on decoder: auto is fast on the pil decoder and the
    full-size decode on the torchvision one (which has no DCT scaling; it is fast on the GPU anyway)."""
    if mode == "auto":
        return JPEG_DECODES["fast"] if decoder == "pil" else 0
    if mode not in JPEG_DECODES:
        raise PipelineError(f"unknown --jpeg-decode {mode!r}: use auto, {', '.join(JPEG_DECODES)}")
    return JPEG_DECODES[mode]


def decode_mode(draft: int) -> str:
    """The --jpeg-decode name of a spec's draft margin (for messages)."""
    return next((k for k, v in JPEG_DECODES.items() if v == draft), f"draft x{draft}")


def decode_hint(was: int, now: int) -> str:
    """Why a cache whose JPEGs were decoded with draft margin `was` takes no rows decoded with `now`."""
    was, now = decode_mode(was), decode_mode(now)
    return (f"its JPEGs were decoded with --jpeg-decode {was} (caches made before fast became the default are "
            f"exact), this extract uses {now}: pass --jpeg-decode {was} to add to it as it was made, or --force "
            "to rebuild it")
