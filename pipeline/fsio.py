"""Shared file helpers, the one place for each: atomic writes, weights-only loading, content digests.

Every file the tool writes appears whole or not at all: it is written to a unique temp name beside
the target, fsynced and renamed over it; a failed write removes its temp file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import threading
import uuid
from pathlib import Path

from . import PipelineError, check_torch_version


def temp_name(path: Path, suffix: str = "") -> Path:
    """A hidden temp path beside path, unique per process and call (two runs never share one)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ""):
    """Yields a temp path to write (by any library: h5py, savefig, torch.export); on success it is
    fsynced and renamed over path, on any failure it is removed and path is left as it was.
    suffix: an extension the writer needs to see on the temp name (e.g. '.png')."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """JSON that other tools can read: NaN/inf are refused rather than written as bare tokens."""
    atomic_write_bytes(path, json.dumps(obj, indent=2, allow_nan=False).encode())


def load_weights_only(path: str | os.PathLike, what: str = "file") -> object:
    """torch.load(weights_only=True) and nothing else: a pickle payload is refused, never run."""
    import torch

    check_torch_version(torch.__version__)
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise PipelineError(f"refused {path}: it holds pickled objects that weights_only loading will not run "
                            f"({first[:160]})") from None
    except Exception as e:
        raise PipelineError(f"cannot read {what} {path}: {type(e).__name__}: {str(e)[:160]}") from None


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """What identifies a file the tool wrote: {"size", "sha256"} (kept by the folder's own record)."""
    return {"size": os.path.getsize(path), "sha256": sha256_file(path)}


def unchanged(path: str | os.PathLike, record) -> bool:
    """path is a plain file with the size and content of record (a file_record): the size first, so a
    changed file of another size is told without reading it."""
    p = Path(path)
    try:
        if p.is_symlink() or not p.is_file() or not isinstance(record, dict):
            return False
        return os.path.getsize(p) == record.get("size") and sha256_file(p) == record.get("sha256")
    except OSError:
        return False


def sha256_json(obj) -> str:
    """Digest of a JSON-able object in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class LockBusy(Exception):
    """ProcessLock could not be taken: holder says who has it ('pid N on HOST'); same_process: this one."""

    def __init__(self, holder: str, same_process: bool):
        super().__init__(holder)
        self.holder, self.same_process = holder, same_process


class ProcessLock:
    """Exclusive lock on a lock file, held by this process until release (or its death).

    A POSIX record lock (fcntl.lockf) belongs to the process that took it: children forked by a
    DataLoader inherit the descriptor but not the lock, so a killed process's lock dies with it even
    while its workers linger (flock locks live on in every inherited descriptor). Record locks do not
    exclude the same process, so a process-wide registry refuses a second holder in-process. The file
    holds 'pid N on HOST' and is removed on release (while still held: the next taker re-checks that
    the file it locked is the one at the path)."""

    _held: set[tuple[int, int]] = set()  # (st_dev, st_ino) of lock files this process holds
    _guard = threading.Lock()

    def __init__(self, path: str | os.PathLike, label: str = ""):
        self.path = Path(path)
        self.label = label  # who holds it, in the file after the pid ('audit'): readers can tell holders apart
        self.fd: int | None = None
        self.key: tuple[int, int] | None = None

    def acquire(self) -> ProcessLock:
        """Take the lock or raise LockBusy (never waits)."""
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            with ProcessLock._guard:
                mine = key in ProcessLock._held
            if mine:
                os.close(fd)
                raise LockBusy(f"pid {os.getpid()}", True)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 128, 0).decode(errors="replace").strip() or "another process"
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise LockBusy(holder, False) from None
                raise
            try:  # the previous holder may have removed the file between our open and lock: retry then
                same = os.stat(self.path).st_ino == st.st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        label = f" ({self.label})" if self.label else ""
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}{label}".encode(), 0)
        with ProcessLock._guard:
            ProcessLock._held.add(key)
        self.fd, self.key = fd, key
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.fd)  # closing releases the record lock
        with ProcessLock._guard:
            ProcessLock._held.discard(self.key)
        self.fd = self.key = None

    def __enter__(self) -> ProcessLock:
        return self if self.fd is not None else self.acquire()  # `with ProcessLock(p).acquire():` works too

    def __exit__(self, *exc) -> None:
        self.release()
