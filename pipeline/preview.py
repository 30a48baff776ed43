"""`preview`: a grid of augmented training images with their class (the tutorial's imshow of a batch)."""
from __future__ import annotations

import torch

from . import PipelineError
from .data import IMAGENET_MEAN, IMAGENET_STD, LabelledImages, find_unreadable, scan_preview_images, train_transform
from .plots import images_grid_png

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")  # what matplotlib writes by the name alone


def preview(data_dir: str, out: str, n: int = 8, seed: int = 0, split: str = "train") -> dict:
    """Draw n random training images (seeded), augmented as finetune does, into out (PNG)."""
    from pathlib import Path

    if Path(out).suffix.lower() not in PICTURE_SUFFIXES:
        raise PipelineError(f"--out {out}: name a picture file ending in {', '.join(PICTURE_SUFFIXES)} "
                            "(e.g. preview.png)")
    from .runfolder import check_output_path

    check_output_path(out)  # a run's pictures belong to the run
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
    images_grid_png(images.numpy(), [class_names[y] for y in labels], out)
    return {"path": str(out), "n": len(files), "classes": [class_names[y] for y in labels]}
