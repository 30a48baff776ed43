"""Feature cache on disk.

Final file (read-only once written):

    / attrs          the root attributes: cache.attrs.CacheAttrs names each one, its type and meaning
    /<split>/features  float32 (N, D)      chunked by rows, fletcher32
    /<split>/views     float32 (N, K, D)   train split only, K > 0
    /<split>/labels    int64   (N,)
    /<split>/paths     utf-8   (N,)        relative to DATA_DIR
    /<split>/image_stats  compound (N,) of float32 pipeline.image_stats.FIELDS: each image's size, brightness,
                       blur, entropy, colour as the decode workers measured them (NaN: not measured); absent in
                       caches made before it
    /skipped           compound (path, reason), every file that was not usable
    /file_stats        compound (path, size, mtime_ns, sha256) of every file the extract decoded (used
                       or skipped): the content index a later extract reuses rows by (cache.reuse)

Crash safety does not rely on HDF5 (which promises none in normal write mode). While extracting, each
finished batch is one small .npz segment in CACHE.partial/, written to a temp name and renamed, so a
kill at any moment leaves only whole segments. A rerun reuses them; the final HDF5 is assembled into
a temp file, fsynced and renamed over CACHE. Readers only ever open CACHE: complete or absent, and
every reader validates it fully (cache.validate) before anything uses it.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from pipeline.fsio import LockBusy, ProcessLock, atomic_output, atomic_write_bytes, fsync_dir, sha256_file

from pipeline.image_stats import DTYPE as STAT_DTYPE
from pipeline.image_stats import FIELDS as STAT_FIELDS
from pipeline.image_stats import as_records, unmeasured

from .attrs import FORMAT, CacheAttrs, decode
from .errors import CacheError, CacheInvalid, CacheLocked, CacheMissing
from .plan import ExtractionPlan, files_digest  # noqa: F401  (files_digest: part of the cache API)
from .validate import RESERVED, check_layout, check_values

ROW_CHUNK = 256
STR = h5py.string_dtype("utf-8")
SKIPPED_DTYPE = np.dtype([("path", STR), ("reason", STR)])
STATS_DTYPE = np.dtype([("path", STR), ("size", np.int64), ("mtime_ns", np.int64), ("sha256", "S64")])


def fingerprint(fields: dict) -> str:
    """sha256 of everything that changes a feature (canonical JSON)."""
    blob = json.dumps({"format": FORMAT, **fields}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------- locking


class CacheLock:
    """Exclusive lock on CACHE.lock, held for a whole extract; refuses a second writer. A process-bound
    lock (fsio.ProcessLock): a killed extract's lock dies with it even while its workers linger."""

    def __init__(self, cache_path: str | os.PathLike):
        self.cache_path = Path(cache_path)
        self.path = self.cache_path.with_name(self.cache_path.name + ".lock")
        self._lock = ProcessLock(self.path)

    def __enter__(self) -> "CacheLock":
        try:
            self._lock.acquire()
        except LockBusy as e:
            raise CacheLocked(f"cache {self.cache_path} is locked by {e.holder} (an extract is running); "
                              "wait for it to finish") from None
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()


# --------------------------------------------------------------------------- writing


@dataclass
class Segment:
    split: str
    start: int
    stop: int
    path: Path


def cache_temp_files(cache_path: Path) -> list[Path]:
    """Temp files of assemblies into cache_path (fsio.temp_name's names, and older pid-only ones)."""
    return sorted(cache_path.parent.glob(f".{cache_path.name}.tmp-*"))


def _ours(folder: Path) -> bool:
    """Whether folder holds only what a PartialWriter writes (so removing it deletes nothing of the user's)."""
    return all(p.name == "plan.json" or p.suffix == ".npz" or (p.name.startswith(".") and ".tmp-" in p.name)
               for p in folder.iterdir())


class PartialWriter:
    """Resumable extraction state in CACHE.partial/: plan.json (the ExtractionPlan) and one .npz per
    finished batch (rows start..stop of a split: ok mask, skip reasons, features, views, file sha256s)."""

    def __init__(self, cache_path: str | os.PathLike, plan: ExtractionPlan):
        self.cache_path = Path(cache_path)
        self.dir = self.cache_path.with_name(self.cache_path.name + ".partial")
        self.plan = plan
        self.resumed = False
        self.discarded = ""

    # -- state
    def _old_plan(self) -> ExtractionPlan | None:
        try:
            return ExtractionPlan.from_json((self.dir / "plan.json").read_text())
        except OSError:
            return None

    def open(self) -> "PartialWriter":
        """Reuse the segments of an interrupted run of the same plan, or start clean. Call under CacheLock."""
        if self.dir.exists():
            if not self.dir.is_dir() or not _ours(self.dir):
                raise CacheError(f"{self.dir} exists and is not an extract's work folder (it holds other files); "
                                 "move it away or choose another --cache")
            if self.plan.same_work(self._old_plan()):
                self.resumed = bool(self.segments())
            else:
                self.discarded = "an interrupted extract with other settings or files"
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp-*"):  # a write killed before its rename
            stale.unlink()
        for stale in cache_temp_files(self.cache_path):  # an assembly killed before its rename (we hold the lock)
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        if not (self.dir / "plan.json").exists():
            atomic_write_bytes(self.dir / "plan.json", self.plan.to_json().encode())
        return self

    def join(self) -> "PartialWriter":
        """For the other ranks of a torchrun job: use the folder rank 0 opened, never wipe it."""
        if not (self.dir / "plan.json").is_file():
            raise CacheError(f"{self.dir} is not ready: rank 0 did not open it (is the cache path on a "
                             "filesystem every node sees?)")
        if not self.plan.same_work(self._old_plan()):
            raise CacheError(f"{self.dir} belongs to another extraction plan")
        return self

    def segments(self, split: str | None = None) -> list[Segment]:
        out = []
        for p in self.dir.glob("*.npz"):
            try:
                name, start, stop = p.stem.rsplit("-", 2)
                seg = Segment(name, int(start), int(stop), p)
            except ValueError:
                continue  # not a segment name: never ours
            if split is None or name == split:
                out.append(seg)
        return sorted(out, key=lambda s: (s.split, s.start))

    def done_files(self, split: str) -> int:
        return sum(s.stop - s.start for s in self.segments(split))

    def todo(self, split: str, lo: int = 0, hi: int | None = None) -> list[tuple[int, int]]:
        """Gaps in [lo, hi) not covered by a finished segment."""
        return gaps(self.segments(split), lo, self.plan.rows(split) if hi is None else hi)

    def file_digests(self, split: str, start: int, stop: int) -> list[str]:
        """sha256 of the files of rows start..stop ('' for one that cannot be read now). The workers
        just read them (page cache); hashlib releases the GIL, so a few threads hash a batch at once."""
        from concurrent.futures import ThreadPoolExecutor

        root = Path(self.plan.root)

        def one(p: str) -> str:
            try:
                return sha256_file(root / p)
            except OSError:
                return ""

        paths = self.plan.splits[split].paths[start:stop]
        if len(paths) < 4:
            return [one(p) for p in paths]
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return list(pool.map(one, paths))

    def write_segment(self, split: str, start: int, features: np.ndarray, reasons: list[str],
                      views: np.ndarray | None = None, digests: list[str] | None = None,
                      stats: np.ndarray | None = None) -> None:
        """Rows start..start+len(reasons) of split: features/views of the good ones, reasons of the bad ones.
        digests: the rows' file sha256s when known (rows reused from a cache); else read from the files.
        stats: (rows, image_stats.FIELDS) measures of the images; None: not measured (NaN)."""
        ok = np.array([r == "" for r in reasons], dtype=bool)
        stop = start + len(reasons)
        dim, k = self.plan.feature_dim, self.plan.views_of(split)
        digests = self.file_digests(split, start, stop) if digests is None else digests
        arrays = {
            "ok": ok,
            "reasons": np.array(reasons, dtype=str),
            "features": np.ascontiguousarray(features[ok], dtype=np.float32).reshape(-1, dim),
            "views": (np.zeros((int(ok.sum()), k, dim), np.float32) if views is None
                      else np.ascontiguousarray(views[ok], dtype=np.float32).reshape(-1, k, dim)),
            "sha256": np.array(digests, dtype="S64").reshape(len(reasons)),
            "image_stats": (np.full((int(ok.sum()), len(STAT_FIELDS)), np.nan, np.float32) if stats is None
                            else np.asarray(stats, np.float32).reshape(len(reasons), len(STAT_FIELDS))[ok]),
        }
        final = self.dir / f"{split}-{start:09d}-{stop:09d}.npz"
        tmp = self.dir / f".{final.name}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def views_of(self, split: str) -> int:
        return self.plan.views_of(split)

    # -- assembly
    def _load_split(self, split: str) -> list[Segment]:
        n = self.plan.rows(split)
        segs = self.segments(split)
        pos = 0
        for s in segs:
            if s.start != pos:
                raise CacheError(f"partial cache {self.dir} is missing rows {pos}..{s.start} of {split}")
            pos = s.stop
        if pos != n:
            raise CacheError(f"partial cache {self.dir} has {pos} of {n} rows of {split}")
        return segs

    def _check_space(self) -> None:
        """Refuse before writing when the file cannot fit: the assembled cache is about as big as the segments."""
        need = sum(s.path.stat().st_size for s in self.segments()) + (1 << 20)
        try:
            free = shutil.disk_usage(self.cache_path.parent).free
        except OSError:
            return
        if free < need:
            raise CacheError(f"not enough free space for cache {self.cache_path}: it needs about {need / 1e6:.0f} MB, "
                             f"{free / 1e6:.0f} MB are free; free some space and rerun (finished work is kept)")

    def finalize(self, attrs: CacheAttrs, scan_skipped: list[tuple[str, str]]) -> dict:
        """Assemble the HDF5 file (streaming, one segment at a time) into a temp file, fsync, rename over CACHE.

        On any failure (a full disk) the temp file is closed and removed, and CACHE.partial/ is kept, so
        the rerun only assembles again."""
        segs = {split: self._load_split(split) for split in self.plan.splits}
        self._check_space()
        with atomic_output(self.cache_path) as tmp:
            result = _in_child(lambda: self._assemble(tmp, segs, attrs, scan_skipped), self.cache_path)
        fsync_dir(self.cache_path.parent)
        shutil.rmtree(self.dir)
        return result

    def _assemble(self, tmp: Path, segs, attrs: CacheAttrs, scan_skipped) -> dict:
        with h5py.File(tmp, "w") as f:
            return self._write(f, segs, attrs, scan_skipped)

    def _write(self, f: h5py.File, segs: dict[str, list[Segment]], attrs: CacheAttrs,
               scan_skipped: list[tuple[str, str]]) -> dict:
        dim = self.plan.feature_dim
        skipped = list(scan_skipped)
        stats = []
        counts = {}
        for split, sp in self.plan.splits.items():
            k = self.views_of(split)
            oks = [np.load(s.path, allow_pickle=False)["ok"] for s in segs[split]]
            n_ok = int(sum(o.sum() for o in oks))
            ok_all = np.concatenate(oks) if oks else np.zeros(0, bool)
            g = f.create_group(split)
            chunk = max(1, min(ROW_CHUNK, n_ok))
            feats = g.create_dataset("features", (n_ok, dim), np.float32, chunks=(chunk, dim),
                                     maxshape=(None, dim), fletcher32=True)
            vds = (g.create_dataset("views", (n_ok, k, dim), np.float32, chunks=(max(1, min(32, n_ok)), k, dim),
                                    maxshape=(None, k, dim), fletcher32=True) if k else None)
            paths = np.asarray(sp.paths, dtype=object)
            labels = np.asarray(sp.labels, dtype=np.int64)
            g.create_dataset("labels", data=labels[ok_all], chunks=(max(1, min(4096, n_ok)),),
                             maxshape=(None,), fletcher32=True)
            g.create_dataset("paths", data=paths[ok_all].astype(STR) if n_ok else np.zeros(0, STR), dtype=STR,
                             chunks=(max(1, min(4096, n_ok)),), maxshape=(None,))
            sds = g.create_dataset("image_stats", (n_ok,), STAT_DTYPE, chunks=(max(1, min(4096, n_ok)),),
                                   maxshape=(None,), fletcher32=True)
            row = 0
            for s in segs[split]:
                with np.load(s.path, allow_pickle=False) as z:
                    m = len(z["features"])
                    feats[row:row + m] = z["features"]
                    if vds is not None:
                        vds[row:row + m] = z["views"]
                    if m:  # segments of an extract started before the measures: not measured
                        sds[row:row + m] = (as_records(z["image_stats"]) if "image_stats" in z.files
                                            else unmeasured(m))
                    reasons = z["reasons"]
                    digests = z["sha256"] if "sha256" in z.files else np.zeros(len(reasons), "S64")
                    for i, r in enumerate(reasons):
                        j = s.start + i
                        if r:
                            skipped.append((paths[j], str(r)))
                        stats.append((paths[j], sp.sizes[j], sp.mtimes[j], digests[i]))
                    row += m
            counts[split] = n_ok
        skipped.sort()
        stats.sort()
        sk = np.array(skipped, dtype=SKIPPED_DTYPE) if skipped else np.zeros(0, SKIPPED_DTYPE)
        f.create_dataset("skipped", data=sk, maxshape=(None,), chunks=(max(1, min(1024, len(sk))),))
        st = np.array(stats, dtype=STATS_DTYPE) if stats else np.zeros(0, STATS_DTYPE)
        f.create_dataset("file_stats", data=st, maxshape=(None,), chunks=(max(1, min(4096, len(st))),),
                         fletcher32=True)
        for key, value in attrs.assembled().to_h5().items():
            f.attrs[key] = value
        return {"rows": counts, "skipped": skipped}


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())[:240]


def _in_child(work, cache_path: Path):
    """work() in a forked child process, its result or its error passed back.

    When a write fails (a full disk), HDF5 can crash the process later while h5py releases the file
    (a segmentation fault at exit). In a child, such a crash becomes one error line here, and the caller
    removes the temp file. The child only runs h5py and numpy (no torch, no CUDA), so forking is safe."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def child():
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)  # h5py prints a traceback per object it fails to release: the parent says it once
        try:
            msg = ("ok", work())
        except OSError as e:
            msg = (("oserror", e.errno, " ".join(e.strerror.split())[:240], e.filename) if e.errno and e.strerror
                   else ("error", _one_line(e)))
        except BaseException as e:  # noqa: BLE001  (any failure goes back to the parent as text)
            msg = ("error", _one_line(e))
        send.send(msg)
        send.close()

    proc = ctx.Process(target=child, name="assemble-cache")
    proc.start()
    send.close()
    try:
        msg = recv.recv()
    except EOFError:
        msg = None
    finally:
        recv.close()
        proc.join()
    if msg is not None and msg[0] == "ok" and proc.exitcode == 0:
        return msg[1]
    if msg is not None and msg[0] == "oserror":
        raise OSError(msg[1], msg[2], msg[3])
    why = msg[1] if msg is not None and msg[0] == "error" else f"the HDF5 library crashed (exit {proc.exitcode})"
    try:
        free = f"{shutil.disk_usage(cache_path.parent).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    raise CacheError(f"assembling cache {cache_path} failed: {why}; is the disk full ({free})? "
                     "Finished work is kept: free some space and rerun the same command")


def gaps(segments: list[Segment], lo: int, hi: int) -> list[tuple[int, int]]:
    """The ranges of [lo, hi) that no segment covers (segments sorted by start)."""
    out, pos = [], lo
    for s in segments:
        if s.stop <= lo or s.start >= hi:
            continue
        if s.start > pos:
            out.append((pos, s.start))
        pos = max(pos, s.stop)
    if pos < hi:
        out.append((pos, hi))
    return out


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int
    sha256: str  # '' when the file could not be read at extraction


@dataclass
class SplitData:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    paths: list[str]
    views: np.ndarray | None = None  # (N, K, D) float32
    image_stats: np.ndarray | None = None  # (N,) records of image_stats.DTYPE; None: made before the measures


@dataclass
class FeatureCache:
    path: Path
    meta: CacheAttrs  # the root attributes, parsed and checked
    splits: dict[str, SplitData] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    file_stats: dict[str, FileStat] | None = None  # None: made before file stats were recorded

    @property
    def attrs(self) -> dict:
        """The root attributes as stored (JSON ones as text); meta has them typed."""
        return self.meta.to_h5()

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.class_names)

    @property
    def feature_dim(self) -> int:
        return self.meta.feature_dim


def _open(path: Path) -> h5py.File:
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        hint = " (an extract into it is unfinished: rerun the same extract command to resume it)" if partial.exists() else ""
        raise CacheMissing(f"cache {path} does not exist{hint}")
    if not path.is_file():
        raise CacheInvalid(f"cache {path} is not a regular file")
    try:
        # the final file is immutable once renamed into place, so no HDF5 file locking is needed to read it
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        raise CacheInvalid(f"cache {path} is damaged or not an HDF5 file ({str(e).splitlines()[0][:120]}); "
                           "rebuild it with: extract ... --force") from None


def read_attrs(path: str | os.PathLike) -> CacheAttrs:
    """The root attributes of the cache at path, parsed and checked (no dataset is read)."""
    path = Path(path)
    with _open(path) as f:
        return CacheAttrs.from_h5(path, f.attrs)


READ_SECONDS_ENV = "TLEARN_CACHE_READ_TIMEOUT"


def read_timeout(path: Path) -> float:
    """How long reading a cache may take before it counts as damaged: generous (60 s + 20 s per GB, a
    slow disk's pace), overridable with TLEARN_CACHE_READ_TIMEOUT."""
    if os.environ.get(READ_SECONDS_ENV):
        return float(os.environ[READ_SECONDS_ENV])
    return 60.0 + 20.0 * path.stat().st_size / 1e9


def read_cache(path: str | os.PathLike, with_views: bool = True) -> FeatureCache:
    """Load a complete cache into memory; refuses incomplete, foreign, crafted or corrupted files.

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
        raise CacheInvalid(f"reading cache {path} took longer than {read_timeout(path):.3g} s; it is probably damaged: "
                           f"rebuild it with: extract ... --force (or raise {READ_SECONDS_ENV})")
    if "error" in result:
        raise result["error"]
    return result["cache"]


def _read_cache(path: Path, with_views: bool) -> FeatureCache:
    with _open(path) as f:
        meta, splits = check_layout(path, f)  # attrs, storage, shapes: before any data is read
        out = FeatureCache(path, meta)
        try:
            for name in splits:
                g = f[name]
                views = g["views"][...] if (with_views and "views" in g) else None
                out.splits[name] = SplitData(
                    features=g["features"][...], labels=g["labels"][...].astype(np.int64),
                    paths=[decode(p) for p in g["paths"][...]], views=views,
                    image_stats=g["image_stats"][...] if "image_stats" in g else None)
            out.skipped = [(decode(r["path"]), decode(r["reason"])) for r in f["skipped"][...]]
            if "file_stats" in f:
                out.file_stats = {decode(r["path"]): FileStat(int(r["size"]), int(r["mtime_ns"]), decode(r["sha256"]))
                                  for r in f["file_stats"][...]}
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise CacheInvalid(f"cache {path} is damaged ({str(e).splitlines()[0][:120]}); "
                               "rebuild it with: extract ... --force") from None
    check_values(path, out)
    return out
