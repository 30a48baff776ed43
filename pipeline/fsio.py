"""Shared file helpers, the one place for each: atomic writes, weights-only loading, content digests.

Every file the tool writes appears whole or not at all: it is written to a unique temp name beside
the target, fsynced and renamed over it; a failed write removes its temp file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
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


def sha256_json(obj) -> str:
    """Digest of a JSON-able object in canonical form (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
