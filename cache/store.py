"""Feature cache on disk.

Final file (read-only once written):

    / attrs          format, fingerprint, files_digest, complete, backbone, weights, feature_dim,
                     class_names (JSON), transform (JSON), precision, views, config (JSON)
    /<split>/features  float32 (N, D)      chunked by rows, fletcher32
    /<split>/views     float32 (N, K, D)   train split only, K > 0
    /<split>/labels    int64   (N,)
    /<split>/paths     utf-8   (N,)        relative to DATA_DIR
    /skipped           compound (path, reason), every file that was not usable

Crash safety does not rely on HDF5 (which promises none in normal write mode). While extracting, each
finished batch is one small .npz segment in CACHE.partial/, written to a temp name and renamed, so a
kill at any moment leaves only whole segments. A rerun reuses them; the final HDF5 is assembled into
a temp file, fsynced and renamed over CACHE. Readers only ever open CACHE: complete or absent.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.fsio import atomic_write_bytes, fsync_dir, sha256_json

from .errors import CacheError, CacheMissing

FORMAT = "feature-cache/1"
ROW_CHUNK = 256
STR = h5py.string_dtype("utf-8")
SKIPPED_DTYPE = np.dtype([("path", STR), ("reason", STR)])


def fingerprint(fields: dict) -> str:
    """sha256 of everything that changes a feature (canonical JSON)."""
    blob = json.dumps({"format": FORMAT, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def files_digest(class_names: list[str], splits: dict[str, tuple[list[str], list[int]]]) -> str:
    """Digest of the class names and every (path, label) of every split."""
    return sha256_json({"classes": class_names, "splits": {k: [list(v[0]), list(v[1])] for k, v in splits.items()}})


# --------------------------------------------------------------------------- locking


class CacheLock:
    """Exclusive advisory lock on CACHE.lock, held for a whole extract; refuses a second writer."""

    def __init__(self, cache_path: str | os.PathLike):
        self.cache_path = Path(cache_path)
        self.path = self.cache_path.with_name(self.cache_path.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> "CacheLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise CacheError(f"cache {self.cache_path} is locked by {holder} (an extract is running); "
                                 "wait for it to finish") from None
            # the previous holder may have unlinked the file between our open and flock: retry then
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- writing


@dataclass
class Segment:
    split: str
    start: int
    stop: int
    path: Path


class PartialWriter:
    """Resumable extraction state in CACHE.partial/: a plan.json and one .npz per finished batch.

    plan = {"fingerprint", "files_digest", "feature_dim", "views", "views_split",
            "splits": {name: {"paths": [...], "labels": [...]}}}
    Only views_split (train) carries the K augmented views.
    """

    def __init__(self, cache_path: str | os.PathLike, plan: dict):
        self.cache_path = Path(cache_path)
        self.dir = self.cache_path.with_name(self.cache_path.name + ".partial")
        self.plan = plan
        self.resumed = False
        self.discarded = ""

    # -- state
    def open(self) -> "PartialWriter":
        """Reuse the segments of an interrupted run of the same plan, or start clean."""
        plan_file = self.dir / "plan.json"
        if self.dir.exists():
            try:
                old = json.loads(plan_file.read_text())
                same = all(old.get(k) == self.plan[k] for k in ("fingerprint", "files_digest", "feature_dim", "views"))
            except (OSError, ValueError):
                same = False
            if same:
                self.resumed = bool(self.segments())
            else:
                self.discarded = "an interrupted extract with other settings or files"
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp-*"):  # a write killed before its rename
            stale.unlink()
        if not plan_file.exists():
            atomic_write_bytes(plan_file, json.dumps(self.plan).encode())
        return self

    def join(self) -> "PartialWriter":
        """For the other ranks of a torchrun job: use the folder rank 0 opened, never wipe it."""
        try:
            old = json.loads((self.dir / "plan.json").read_text())
        except (OSError, ValueError):
            raise CacheError(f"{self.dir} is not ready: rank 0 did not open it (is the cache path on a "
                             "filesystem every node sees?)") from None
        if any(old.get(k) != self.plan[k] for k in ("fingerprint", "files_digest")):
            raise CacheError(f"{self.dir} belongs to another extraction plan")
        return self

    def segments(self, split: str | None = None) -> list[Segment]:
        out = []
        for p in self.dir.glob("*.npz"):
            name, start, stop = p.stem.rsplit("-", 2)
            if split is None or name == split:
                out.append(Segment(name, int(start), int(stop), p))
        return sorted(out, key=lambda s: (s.split, s.start))

    def done_files(self, split: str) -> int:
        return sum(s.stop - s.start for s in self.segments(split))

    def todo(self, split: str, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
        """Gaps in [lo, hi) not covered by a finished segment."""
        hi = len(self.plan["splits"][split]["paths"]) if hi is None else hi
        gaps, pos = [], lo
        for s in self.segments(split):
            if s.stop <= lo or s.start >= hi:
                continue
            if s.start > pos:
                gaps.append((pos, s.start))
            pos = max(pos, s.stop)
        if pos < hi:
            gaps.append((pos, hi))
        return gaps

    def write_segment(self, split: str, start: int, features: np.ndarray, reasons: list[str],
                      views: np.ndarray | None = None) -> None:
        """Rows start..start+len(reasons) of split: features/views of the good ones, reasons of the bad ones."""
        ok = np.array([r == "" for r in reasons], dtype=bool)
        stop = start + len(reasons)
        dim, k = self.plan["feature_dim"], self.views_of(split)
        arrays = {
            "ok": ok,
            "reasons": np.array(reasons, dtype=str),
            "features": np.ascontiguousarray(features[ok], dtype=np.float32).reshape(-1, dim),
            "views": (np.zeros((int(ok.sum()), k, dim), np.float32) if views is None
                      else np.ascontiguousarray(views[ok], dtype=np.float32).reshape(-1, k, dim)),
        }
        final = self.dir / f"{split}-{start:09d}-{stop:09d}.npz"
        tmp = self.dir / f".{final.name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def views_of(self, split: str) -> int:
        return self.plan["views"] if split == self.plan.get("views_split") else 0

    # -- assembly
    def _load_split(self, split: str):
        n = len(self.plan["splits"][split]["paths"])
        segs = self.segments(split)
        pos = 0
        for s in segs:
            if s.start != pos:
                raise CacheError(f"partial cache {self.dir} is missing rows {pos}..{s.start} of {split}")
            pos = s.stop
        if pos != n:
            raise CacheError(f"partial cache {self.dir} has {pos} of {n} rows of {split}")
        return segs

    def finalize(self, attrs: dict, scan_skipped: list[tuple[str, str]]) -> dict:
        """Assemble the HDF5 file (streaming, one segment at a time), fsync, rename over CACHE."""
        dim = self.plan["feature_dim"]
        tmp = self.cache_path.with_name(f".{self.cache_path.name}.tmp-{os.getpid()}")
        skipped = list(scan_skipped)
        counts = {}
        with h5py.File(tmp, "w") as f:
            for split, meta in self.plan["splits"].items():
                segs = self._load_split(split)
                k = self.views_of(split)
                oks = [np.load(s.path, allow_pickle=False)["ok"] for s in segs]
                n_ok = int(sum(o.sum() for o in oks))
                ok_all = np.concatenate(oks) if oks else np.zeros(0, bool)
                g = f.create_group(split)
                chunk = max(1, min(ROW_CHUNK, n_ok))
                feats = g.create_dataset("features", (n_ok, dim), np.float32, chunks=(chunk, dim),
                                         maxshape=(None, dim), fletcher32=True)
                vds = (g.create_dataset("views", (n_ok, k, dim), np.float32, chunks=(max(1, min(32, n_ok)), k, dim),
                                        maxshape=(None, k, dim), fletcher32=True) if k else None)
                paths = np.asarray(meta["paths"], dtype=object)
                labels = np.asarray(meta["labels"], dtype=np.int64)
                g.create_dataset("labels", data=labels[ok_all], chunks=(max(1, min(4096, n_ok)),),
                                 maxshape=(None,), fletcher32=True)
                g.create_dataset("paths", data=paths[ok_all].astype(STR) if n_ok else np.zeros(0, STR), dtype=STR,
                                 chunks=(max(1, min(4096, n_ok)),), maxshape=(None,))
                row = 0
                for s in segs:
                    with np.load(s.path, allow_pickle=False) as z:
                        m = len(z["features"])
                        feats[row:row + m] = z["features"]
                        if vds is not None:
                            vds[row:row + m] = z["views"]
                        reasons = z["reasons"]
                        skipped += [(paths[s.start + i], str(r)) for i, r in enumerate(reasons) if r]
                        row += m
                counts[split] = n_ok
            skipped.sort()
            sk = np.array(skipped, dtype=SKIPPED_DTYPE) if skipped else np.zeros(0, SKIPPED_DTYPE)
            f.create_dataset("skipped", data=sk, maxshape=(None,), chunks=(max(1, min(1024, len(sk))),))
            for key, value in attrs.items():
                f.attrs[key] = str(value) if isinstance(value, str) else value
            f.attrs["complete"] = True
            f.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.cache_path)
        fsync_dir(self.cache_path.parent)
        shutil.rmtree(self.dir)
        return {"rows": counts, "skipped": skipped}


# --------------------------------------------------------------------------- reading


@dataclass
class SplitData:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    paths: list[str]
    views: np.ndarray | None = None  # (N, K, D) float32


@dataclass
class FeatureCache:
    path: Path
    attrs: dict
    splits: dict[str, SplitData] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def class_names(self) -> list[str]:
        return json.loads(self.attrs["class_names"])

    @property
    def feature_dim(self) -> int:
        return int(self.attrs["feature_dim"])


def _open(path: Path) -> h5py.File:
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        hint = " (an extract into it is unfinished: rerun the same extract command to resume it)" if partial.exists() else ""
        raise CacheMissing(f"cache {path} does not exist{hint}")
    try:
        # the final file is immutable once renamed into place, so no HDF5 file locking is needed to read it
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        raise CacheError(f"cache {path} is damaged or not an HDF5 file ({str(e).splitlines()[0][:120]}); "
                         "rebuild it with: extract ... --force") from None


def _decode(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_attrs(path: str | os.PathLike) -> dict:
    with _open(Path(path)) as f:
        return {k: _decode(v) for k, v in f.attrs.items()}


READ_SECONDS_ENV = "TLEARN_CACHE_READ_TIMEOUT"


def read_timeout(path: Path) -> float:
    """How long reading a cache may take before it counts as damaged: generous (60 s + 20 s per GB, a
    slow disk's pace), overridable with TLEARN_CACHE_READ_TIMEOUT."""
    if os.environ.get(READ_SECONDS_ENV):
        return float(os.environ[READ_SECONDS_ENV])
    return 60.0 + 20.0 * path.stat().st_size / 1e9


def read_cache(path: str | os.PathLike, with_views: bool = True) -> FeatureCache:
    """Load a complete cache into memory; refuses incomplete, foreign or corrupted files.

    The read runs in a helper thread with a time bound, so a damaged file that sends HDF5 into a
    long loop is reported instead of hanging the command."""
    path = Path(path)
    if not path.exists():
        _open(path)  # raises the 'does not exist' message (with the resume hint)
    result: dict = {}

    def work():
        try:
            result["cache"] = _read_cache(path, with_views)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    t = threading.Thread(target=work, name="read-cache", daemon=True)
    t.start()
    t.join(read_timeout(path))
    if t.is_alive():
        raise CacheError(f"reading cache {path} took longer than {read_timeout(path):.3g} s; it is probably damaged: "
                         f"rebuild it with: extract ... --force (or raise {READ_SECONDS_ENV})")
    if "error" in result:
        raise result["error"]
    return result["cache"]


def _read_cache(path: Path, with_views: bool) -> FeatureCache:
    with _open(path) as f:
        attrs = {k: _decode(v) for k, v in f.attrs.items()}
        if attrs.get("format") != FORMAT:
            raise CacheError(f"{path} is not a feature cache of this tool (format {attrs.get('format')!r}, "
                             f"expected {FORMAT!r}); extract into a new file")
        if not attrs.get("complete"):
            raise CacheError(f"cache {path} is incomplete; rerun the extract command to finish it")
        out = FeatureCache(path, attrs)
        try:
            for name, g in f.items():
                if not isinstance(g, h5py.Group):
                    continue
                views = g["views"][...] if (with_views and "views" in g) else None
                out.splits[name] = SplitData(
                    features=g["features"][...], labels=g["labels"][...].astype(np.int64),
                    paths=[p.decode() if isinstance(p, bytes) else p for p in g["paths"][...]], views=views)
            out.skipped = [(_decode(p), _decode(r)) for p, r in f["skipped"][...]]
        except (OSError, KeyError) as e:
            raise CacheError(f"cache {path} is damaged ({str(e).splitlines()[0][:120]}); "
                             "rebuild it with: extract ... --force") from None
    return out
