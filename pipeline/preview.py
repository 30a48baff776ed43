"""`preview`: a grid of augmented training images with their class (the tutorial's imshow of a batch).

The picture carries a mark (PREVIEW_MARK in its metadata: PNG text, JPEG comment, PDF/SVG creator): an
existing --out file is replaced only when it has the mark, so a rerun replaces its own grid and never a
user's photo or picture."""
from __future__ import annotations

from pathlib import Path

import torch

from . import PipelineError
from .data import IMAGENET_MEAN, IMAGENET_STD, LabelledImages, find_unreadable, scan_preview_images, train_transform
from .plots import images_grid_png

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")  # what matplotlib writes by the name alone
PREVIEW_MARK = "tlearn-preview/1"
_MAGIC = {".png": (b"\x89PNG\r\n\x1a\n",), ".jpg": (b"\xff\xd8",), ".jpeg": (b"\xff\xd8",), ".pdf": (b"%PDF",),
          ".svg": (b"<?xml", b"<svg")}
_MARK_LIMIT = 64 << 20  # a preview grid is a few MB; a larger file is not one


def savefig_mark(suffix: str) -> dict:
    """savefig keywords that write PREVIEW_MARK into a picture of this suffix."""
    if suffix in (".jpg", ".jpeg"):
        return {"pil_kwargs": {"comment": PREVIEW_MARK.encode()}}
    return {"metadata": {"Software" if suffix == ".png" else "Creator": PREVIEW_MARK}}


def is_own_preview(path: Path) -> bool:
    """A picture that preview wrote: the format its suffix names, with PREVIEW_MARK in it."""
    magic = _MAGIC.get(path.suffix.lower())
    try:
        if magic is None or path.stat().st_size > _MARK_LIMIT:
            return False
        data = path.read_bytes()
    except OSError:
        return False
    return data.startswith(magic) and PREVIEW_MARK.encode() in data


def preview(data_dir: str, out: str, n: int = 8, seed: int = 0, split: str = "train") -> dict:
    """Draw n random training images (seeded), augmented as finetune does, into out (PNG). An existing out
    is replaced only when preview wrote it (is_own_preview); never a run folder's file."""
    suffix = Path(out).suffix.lower()
    if suffix not in PICTURE_SUFFIXES:
        raise PipelineError(f"--out {out}: name a picture file ending in {', '.join(PICTURE_SUFFIXES)} "
                            "(e.g. preview.png)")
    from .runfolder import check_output_file

    check_output_file(out, is_own_preview, "a preview grid of this tool")
    class_names, sp = scan_preview_images(data_dir, split)  # a flat folder: all its images
    root = Path(data_dir)
    order = torch.randperm(len(sp), generator=torch.Generator().manual_seed(seed)).tolist()
    files, labels = [], []
    for i in order:  # the first n that decode; bad files are skipped, as everywhere
        f = str(root / sp.paths[i])
        if not find_unreadable([f])[0]:
            files.append(f)
            labels.append(sp.labels[i])
        if len(files) == n:
            break
    if not files:
        raise PipelineError(f"no usable images in {root / (split if sp.name else '')}")
    ds = LabelledImages(files, labels, train_transform(), seed)
    batch = torch.stack([ds[(0, i)][0] for i in range(len(files))])
    # undo the normalisation for display: (N,3,H,W) normalised -> (N,H,W,3) in [0, 1]
    images = (batch.permute(0, 2, 3, 1) * torch.tensor(IMAGENET_STD) + torch.tensor(IMAGENET_MEAN)).clamp(0, 1)
    images_grid_png(images.numpy(), [class_names[y] for y in labels], out, savefig=savefig_mark(suffix))
    return {"path": str(out), "n": len(files), "classes": [class_names[y] for y in labels]}
