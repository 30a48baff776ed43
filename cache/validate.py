"""A cache is data from the disk, maybe crafted: every reader checks it fully before using it.

check_layout runs on the open file before any dataset's data is read (links out of the file, external
or virtual storage, attributes, shapes, dtypes); check_values runs on what was read (paths inside the
data folder, labels in range, finite features). Each failure names the file and what is wrong.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import h5py
import numpy as np

from pipeline.image_stats import FIELDS as STAT_FIELDS

from .attrs import CacheAttrs
from .errors import invalid as _invalid

RESERVED = ("skipped", "file_stats")  # root names that are not splits (the /skipped and /file_stats tables)


def _check_storage(path: Path, f: h5py.File) -> None:
    """Every object lives inside this file: no soft or external links, no external or virtual datasets.
    External storage can point at any file (or a FIFO that blocks a reader forever)."""

    def visit(group: h5py.Group, prefix: str) -> None:
        for name in group:
            link = group.get(name, getlink=True)
            where = f"{prefix}/{name}"
            if not isinstance(link, h5py.HardLink):
                raise _invalid(path, f"{where} is a link to elsewhere ({type(link).__name__}), not stored in the file")
            obj = group.get(name)
            if isinstance(obj, h5py.Group):
                visit(obj, where)
            elif isinstance(obj, h5py.Dataset):
                plist = obj.id.get_create_plist()
                if obj.is_virtual or plist.get_layout() == h5py.h5d.VIRTUAL:
                    raise _invalid(path, f"dataset {where} is virtual (its data lives in other files)")
                if plist.get_external_count() > 0:
                    raise _invalid(path, f"dataset {where} uses external storage (its data lives in other files)")

    visit(f, "")


def _dataset(path: Path, g: h5py.Group, name: str, where: str) -> h5py.Dataset:
    obj = g.get(name)
    if not isinstance(obj, h5py.Dataset):
        raise _invalid(path, f"{where}/{name} is missing")
    return obj


def check_layout(path: Path, f: h5py.File) -> tuple[CacheAttrs, list[str]]:
    """Attributes, storage and every dataset's shape and dtype, before any data is read. Returns the
    parsed attributes and the splits."""
    meta = CacheAttrs.from_h5(path, f.attrs)
    _check_storage(path, f)
    dim, views = meta.feature_dim, meta.views
    splits = [k for k in f if k not in RESERVED]
    if not splits:
        raise _invalid(path, "it has no splits")
    for s in splits:
        g = f[s]
        if not isinstance(g, h5py.Group):
            raise _invalid(path, f"/{s} is not a split group")
        feats = _dataset(path, g, "features", f"/{s}")
        if feats.ndim != 2 or feats.shape[1] != dim or feats.dtype.kind != "f":
            raise _invalid(path, f"/{s}/features has shape {feats.shape} {feats.dtype}, expected (N, {dim}) float")
        n = feats.shape[0]
        labels = _dataset(path, g, "labels", f"/{s}")
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise _invalid(path, f"/{s}/labels has shape {labels.shape} {labels.dtype} for {n} feature rows")
        paths = _dataset(path, g, "paths", f"/{s}")
        if paths.shape != (n,) or paths.dtype.kind not in "OSU":
            raise _invalid(path, f"/{s}/paths has shape {paths.shape} for {n} feature rows")
        if "image_stats" in g:
            st = _dataset(path, g, "image_stats", f"/{s}")
            if st.shape != (n,) or st.dtype.names != STAT_FIELDS or \
                    any(st.dtype.fields[f][0] != np.float32 for f in STAT_FIELDS):
                raise _invalid(path, f"/{s}/image_stats has shape {st.shape} {st.dtype}, expected ({n},) records of "
                                     f"float32 {', '.join(STAT_FIELDS)}")
        if "views" in g:
            v = _dataset(path, g, "views", f"/{s}")
            if v.ndim != 3 or v.shape[0] != n or v.shape[2] != dim or v.shape[1] != views or v.dtype.kind != "f":
                raise _invalid(path, f"/{s}/views has shape {v.shape}, expected ({n}, {views}, {dim})")
    sk = f.get("skipped")
    if not isinstance(sk, h5py.Dataset) or sk.dtype.names is None or not {"path", "reason"} <= set(sk.dtype.names):
        raise _invalid(path, "/skipped is missing or not a (path, reason) table")
    st = f.get("file_stats")
    if st is not None and (not isinstance(st, h5py.Dataset) or st.dtype.names is None
                           or not {"path", "size", "mtime_ns", "sha256"} <= set(st.dtype.names)):
        raise _invalid(path, "/file_stats is not a (path, size, mtime_ns, sha256) table")
    return meta, splits


# what each measure can be (image_stats.measure): sizes are whole pixels, fractions within 0..1, entropy in bits
MAX_SIDE = 1 << 24
STAT_RANGES = {"width": (1, MAX_SIDE), "height": (1, MAX_SIDE), "bright_p05": (0, 1),
               "bright_p50": (0, 1), "bright_p95": (0, 1), "clipped": (0, 1), "blur": (0, 1e6), "entropy": (0, 8),
               "colour": (0, 1)}


def bad_image_stats(rec: np.ndarray) -> str:
    """Why the records of image_stats cannot be measures ('' when they can): a row is either measured in full
    (every value finite and in range) or not at all (every value NaN)."""
    if not len(rec):
        return ""
    vals = np.stack([np.asarray(rec[f], np.float64) for f in STAT_FIELDS], 1)
    nan = np.isnan(vals)
    if (nan.any(1) & ~nan.all(1)).any():
        return "holds a row that is partly measured (some values NaN)"
    for k, f in enumerate(STAT_FIELDS):
        v = vals[~nan[:, k], k]
        lo, hi = STAT_RANGES[f]
        if len(v) and not (np.isfinite(v).all() and v.min() >= lo and v.max() <= hi):
            return f"holds {f} values outside {lo}..{hi}"
        if f in ("width", "height") and len(v) and (v != np.round(v)).any():
            return f"holds a {f} that is not a whole number of pixels"
    return ""


def bad_relative_path(p: str) -> bool:
    """True unless p is a plain relative path that stays inside the folder it is relative to."""
    if not isinstance(p, str) or not p or "\0" in p or "\\" in p:
        return True
    pp = PurePosixPath(p)
    return pp.is_absolute() or any(part in ("..", "") for part in p.split("/"))


def check_values(path: Path, cache) -> None:
    """What was read: paths inside the data folder, labels in range, finite features and views."""
    n_classes = len(cache.class_names)
    for s, sp in cache.splits.items():
        bad = next((p for p in sp.paths if bad_relative_path(p)), None)
        if bad is not None:
            raise _invalid(path, f"/{s}/paths holds {bad!r}, not a path inside the data folder")
        if len(sp.labels) and (sp.labels.min() < 0 or sp.labels.max() >= n_classes):
            wrong = int(sp.labels.min() if sp.labels.min() < 0 else sp.labels.max())
            raise _invalid(path, f"/{s}/labels holds {wrong}, outside 0..{n_classes - 1} ({n_classes} classes)")
        if not np.isfinite(sp.features).all():
            raise _invalid(path, f"/{s}/features holds non-finite values (NaN or infinity)")
        if sp.views is not None and not np.isfinite(sp.views).all():
            raise _invalid(path, f"/{s}/views holds non-finite values (NaN or infinity)")
        if sp.image_stats is not None:
            why = bad_image_stats(sp.image_stats)
            if why:
                raise _invalid(path, f"/{s}/image_stats {why}")
    bad = next((p for p, _ in cache.skipped if not isinstance(p, str)), None)
    if bad is not None:
        raise _invalid(path, "/skipped holds a path that is not text")
    if cache.file_stats is not None:
        bad = next((p for p in cache.file_stats if bad_relative_path(p)), None)
        if bad is not None:
            raise _invalid(path, f"/file_stats holds {bad!r}, not a path inside the data folder")
