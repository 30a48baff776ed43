"""`download`: fetch the tutorial's dataset zip, check it, unpack it without letting a member escape DEST."""
from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

from . import PipelineError
from .progress import Progress

DATASET_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
DATASET_NAME = "hymenoptera_data"
REQUIRED_SPLITS = ("train", "val")
# Zip bombs: photos barely compress (JPEG ~1:1, PNG/BMP a few times), so a dataset zip that unpacks to
# more than MAX_RATIO times its size is refused once it would unpack to more than RATIO_FREE_BYTES.
MAX_RATIO = 100
RATIO_FREE_BYTES = 64 << 20
MAX_UNPACKED_BYTES = 64 << 30


class ZipRefused(PipelineError):
    """The zip is unsafe or would not fit: nothing was unpacked."""


class TargetExists(PipelineError):
    """The zip's dataset folder already exists under DEST and tlearn did not create it."""


def dataset_present(root: Path) -> bool:
    return all((root / s).is_dir() and any((root / s).iterdir()) for s in REQUIRED_SPLITS)


def fetch(url: str, dest: Path, progress: Progress, timeout: float = 30.0) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0)
            progress.start(total, "download")
            while block := resp.read(1 << 16):
                out.write(block)
                progress.update(len(block))
            progress.close()
    except (urllib.error.URLError, OSError, ValueError) as e:
        progress.close()
        reason = getattr(e, "reason", None) or e
        raise PipelineError(f"cannot download {url}: {reason}; fetch it by hand and unzip it into the destination")


def _safe_members(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Every member, refusing absolute paths, '..' parts, drive letters and symlinks."""
    for info in zf.infolist():
        name = PurePosixPath(info.filename.replace("\\", "/"))
        if name.is_absolute() or ".." in name.parts or (name.parts and ":" in name.parts[0]):
            raise ZipRefused(f"refused zip: member {info.filename!r} would land outside the destination")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise ZipRefused(f"refused zip: member {info.filename!r} is a symbolic link")
    return zf.infolist()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def check_unpacked_size(zip_bytes: int, unpacked_bytes: int, free_bytes: int) -> None:
    """Refuse a zip bomb (absurd compression ratio or size) and a zip that cannot fit on the disk."""
    if unpacked_bytes > MAX_UNPACKED_BYTES or (unpacked_bytes > RATIO_FREE_BYTES
                                               and unpacked_bytes > MAX_RATIO * max(zip_bytes, 1)):
        raise ZipRefused(f"refused zip: {_mib(zip_bytes)} would unpack to {_mib(unpacked_bytes)} (more than "
                         f"{MAX_RATIO}x its size or {MAX_UNPACKED_BYTES >> 30} GiB); not a photo dataset")
    if unpacked_bytes > free_bytes:
        raise ZipRefused(f"the zip unpacks to {_mib(unpacked_bytes)} but only {_mib(free_bytes)} are free at the "
                         "destination; free some space or choose another DEST")


def _copy_bounded(src, dst, limit: int, name: str) -> None:
    """Copy at most limit bytes (the member's declared size): a lying header cannot grow the output."""
    left = limit
    while block := src.read(1 << 16):
        left -= len(block)
        if left < 0:
            raise ZipRefused(f"refused zip: member {name!r} holds more data than its header declares")
        dst.write(block)


def _dataset_root(names: list[str]) -> str:
    """The folder inside the zip that holds train/ and val/ ('' when they sit at the top)."""
    for n in names:
        parts = PurePosixPath(n).parts
        for i, part in enumerate(parts[:-1]):
            if part in REQUIRED_SPLITS:
                prefix = "/".join(parts[:i])
                if all(any(m.startswith(f"{prefix}/{s}/" if prefix else f"{s}/") for m in names) for s in REQUIRED_SPLITS):
                    return prefix
    raise ZipRefused("the zip does not hold a dataset with train/ and val/ folders of class sub-folders")


def _refuse_existing(target: Path) -> None:
    if target.exists() or target.is_symlink():
        raise TargetExists(f"{target} already exists and the zip would unpack there; tlearn never replaces a "
                           "folder it did not create: move it away or choose another DEST")


def _wanted(members: list[zipfile.ZipInfo], root: str) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """(member, path inside the dataset folder) of every file to unpack."""
    out = []
    for m in members:
        rel = PurePosixPath(m.filename)
        if root:
            rel = rel.relative_to(root) if str(rel).startswith(root + "/") else None
        if rel is None or m.is_dir() or "__MACOSX" in rel.parts:
            continue
        out.append((m, rel))
    return out


def unpack(zip_path: Path, dest: Path) -> Path:
    """Unpack into dest/hymenoptera_data (or the zip's own top folder name); returns the dataset folder.
    A folder of that name that already exists is never touched: the zip is refused instead."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise ZipRefused(f"{zip_path} is not a zip file") from None
    with zf:
        members = _safe_members(zf)
        root = _dataset_root([m.filename for m in members if not m.is_dir()])
        target = dest / (PurePosixPath(root).name if root else DATASET_NAME)
        _refuse_existing(target)
        wanted = _wanted(members, root)
        check_unpacked_size(zip_path.stat().st_size, sum(m.file_size for m, _ in wanted),
                            shutil.disk_usage(dest).free)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest))
        try:
            for m, rel in wanted:
                out = staging.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(out, "wb") as dst:
                    _copy_bounded(src, dst, m.file_size, m.filename)
            _refuse_existing(target)  # it may have appeared while unpacking
            try:
                os.rename(staging, target)  # fails on a non-empty folder: never replaces the user's files
            except OSError:
                _refuse_existing(target)
                raise
        finally:
            if staging.exists():
                shutil.rmtree(staging)  # our own temp folder only
    return target


def download_dataset(dest: str | os.PathLike, url: str = DATASET_URL, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    dest = Path(dest)
    target = dest / DATASET_NAME
    if dataset_present(target):
        return {"path": str(target), "downloaded": False, "message": f"dataset already present at {target}; nothing to do"}
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
        zip_path = Path(tmp) / "dataset.zip"
        fetch(url, zip_path, progress)
        root = unpack(zip_path, dest)
    counts = {s: sum(1 for _ in (root / s).rglob("*") if _.is_file()) for s in REQUIRED_SPLITS}
    return {"path": str(root), "downloaded": True,
            "message": f"dataset unpacked at {root} ({', '.join(f'{k} {v} files' for k, v in counts.items())})"}
