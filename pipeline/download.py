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
            raise PipelineError(f"refused zip: member {info.filename!r} would land outside the destination")
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise PipelineError(f"refused zip: member {info.filename!r} is a symbolic link")
    return zf.infolist()


def _dataset_root(names: list[str]) -> str:
    """The folder inside the zip that holds train/ and val/ ('' when they sit at the top)."""
    for n in names:
        parts = PurePosixPath(n).parts
        for i, part in enumerate(parts[:-1]):
            if part in REQUIRED_SPLITS:
                prefix = "/".join(parts[:i])
                if all(any(m.startswith(f"{prefix}/{s}/" if prefix else f"{s}/") for m in names) for s in REQUIRED_SPLITS):
                    return prefix
    raise PipelineError("the zip does not hold a dataset with train/ and val/ folders of class sub-folders")


def unpack(zip_path: Path, dest: Path) -> Path:
    """Unpack into dest/hymenoptera_data (or the zip's own top folder name); returns the dataset folder."""
    try:
        zf = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        raise PipelineError(f"{zip_path} is not a zip file") from None
    with zf:
        members = _safe_members(zf)
        root = _dataset_root([m.filename for m in members if not m.is_dir()])
        target = dest / (PurePosixPath(root).name if root else DATASET_NAME)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest))
        try:
            for m in members:
                rel = PurePosixPath(m.filename)
                if root:
                    rel = rel.relative_to(root) if str(rel).startswith(root + "/") else None
                if rel is None or m.is_dir() or "__MACOSX" in rel.parts:
                    continue
                out = staging.joinpath(*rel.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
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
