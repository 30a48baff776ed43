"""The feature cache's root attributes: one typed record that extract writes and every reader parses.

On disk they are HDF5 attributes of `/`, written in this order (JSON ones as text):

    format         "feature-cache/1"; a file with another format is not a cache of this tool
    fingerprint    sha256 (hex) of everything that changes a feature (cache.store.fingerprint)
    files_digest   sha256 of the class names and every (path, label, size, mtime_ns) (cache.plan)
    backbone       torchvision architecture name, or the name of the .pt2 program file
    weights        imagenet | none | the weights file as given
    backbone_spec  JSON object: how to rebuild the backbone (pipeline.backbones' description)
    feature_dim    D, from 1 to MAX_FEATURE_DIM
    class_names    JSON list of distinct non-empty names; a label is an index into it
    transform      JSON object: the preprocessing record (pipeline.preprocess.Preprocess.record)
    precision      fp32 | bf16 | fp16
    views          K augmented views per image of the first split (0: none)
    seed           random init (--weights none) and the views' crops
    draft          JPEG draft-mode decoding
    decoder        pil | torchvision: the decoder actually used
    split          JSON object: how train/val/test were made (layout, fractions, seed, digest)
    data_root      the absolute data folder that the cache's paths are relative to
    config         JSON object: the extract's settings as run (without --force)
    torch          the torch version that extracted
    complete       True: the file was assembled in full (a file at the cache path always is)
    created        local time of the assembly, ISO 8601

Required: format, complete, fingerprint, backbone, weights, backbone_spec, feature_dim, class_names,
transform, precision, config. The others are absent from caches made by earlier versions and read as
the defaults below; attributes this version does not know are ignored.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .errors import CacheError, invalid

FORMAT = "feature-cache/1"
MAX_FEATURE_DIM = 1 << 20
_JSON_FIELDS = ("backbone_spec", "class_names", "transform", "split", "config")


@dataclass(frozen=True, kw_only=True)
class CacheAttrs:
    """The root attributes of a feature cache (field order = the order they are written in)."""

    format: str = FORMAT
    fingerprint: str
    files_digest: str | None = None  # None: not recorded
    backbone: str
    weights: str
    backbone_spec: dict
    feature_dim: int
    class_names: tuple[str, ...]
    transform: dict
    precision: str
    views: int = 0
    seed: int | None = None
    draft: bool = False
    decoder: str = "pil"
    split: dict | None = None  # None: made before flat folders (the folder's own split, no digest)
    data_root: str | None = None  # None: made before it was recorded (only config's data_dir, as typed)
    config: dict = field(default_factory=dict)
    torch: str | None = None
    complete: bool = False  # set when the file is assembled
    created: str | None = None

    # -- writing
    def assembled(self) -> "CacheAttrs":
        """The record as the assembly writes it: complete, with its creation time."""
        return replace(self, complete=True, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_h5(self) -> dict:
        """name -> value as stored (JSON fields as text; None fields are left out), in writing order."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name in _JSON_FIELDS:
                value = json.dumps(list(value) if f.name == "class_names" else value, default=list)
            out[f.name] = str(value) if isinstance(value, str) else value  # a numpy str_ would store as fixed-width
        return out

    # -- reading
    @classmethod
    def from_h5(cls, path: Path, attrs: Mapping) -> "CacheAttrs":
        """Parse and check the attributes of the file at path; raises CacheInvalid (or CacheError for a
        foreign or incomplete file) naming the attribute that is wrong."""
        a = {k: decode(v) for k, v in attrs.items()}
        if a.get("format") != FORMAT:
            raise CacheError(f"{path} is not a feature cache of this tool (format {a.get('format')!r}, "
                             f"expected {FORMAT!r}); extract into a new file")
        if not a.get("complete"):
            raise CacheError(f"cache {path} is incomplete; rerun the extract command to finish it")
        fp = a.get("fingerprint")
        if not _sha256(fp):
            raise invalid(path, "attribute fingerprint is missing or not a sha256")
        names = _json(path, a, "class_names", list)
        if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
            raise invalid(path, "attribute class_names is not a list of distinct names")
        backbone_spec = _json(path, a, "backbone_spec", dict)
        config = _json(path, a, "config", dict)
        transform = _json(path, a, "transform", dict)
        for key in ("backbone", "weights", "precision"):
            if not isinstance(a.get(key), str):
                raise invalid(path, f"attribute {key} is missing")
        dim = a.get("feature_dim")
        if not _int(dim) or not 1 <= dim <= MAX_FEATURE_DIM:
            raise invalid(path, f"attribute feature_dim is {dim!r}, not a number from 1 to {MAX_FEATURE_DIM}")
        views = a.get("views", 0)
        if not _int(views) or views < 0:
            raise invalid(path, f"attribute views is {views!r}, not a count")
        # optional since later versions: absent reads as the default, present must have its type
        if "files_digest" in a and not _sha256(a["files_digest"]):
            raise invalid(path, "attribute files_digest is not a sha256")
        if "seed" in a and not _int(a["seed"]):
            raise invalid(path, f"attribute seed is {a['seed']!r}, not a number")
        if "draft" in a and not isinstance(a["draft"], bool):
            raise invalid(path, f"attribute draft is {a['draft']!r}, not true or false")
        for key in ("decoder", "data_root", "torch", "created"):
            if key in a and not isinstance(a[key], str):
                raise invalid(path, f"attribute {key} is not text")
        split = _json(path, a, "split", dict) if "split" in a else None
        return cls(fingerprint=fp, files_digest=a.get("files_digest"), backbone=a["backbone"], weights=a["weights"],
                   backbone_spec=backbone_spec, feature_dim=dim, class_names=tuple(names), transform=transform,
                   precision=a["precision"], views=views, seed=a.get("seed"), draft=a.get("draft", False),
                   decoder=a.get("decoder", "pil"), split=split, data_root=a.get("data_root"), config=config,
                   torch=a.get("torch"), complete=True, created=a.get("created"))


def decode(v):
    """An HDF5 value as Python: bytes as text, numpy scalars as int/float/bool."""
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _sha256(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _json(path: Path, a: dict, key: str, kind: type):
    if key not in a:
        raise invalid(path, f"attribute {key} is missing")
    try:
        value = json.loads(a[key])
    except (TypeError, ValueError):
        raise invalid(path, f"attribute {key} is not JSON") from None
    if not isinstance(value, kind):
        raise invalid(path, f"attribute {key} is not a JSON {kind.__name__}")
    return value
