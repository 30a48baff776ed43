"""Dataset discovery, safe image decoding and the tutorial's transforms.

Discovery is pure and deterministic: sorted classes, sorted files, hidden entries ignored.
Files that cannot be used are never fatal: they become (path, reason) rows in `skipped`.
"""
from __future__ import annotations

import os
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from . import PipelineError

# torchvision's ImageFolder list; matched case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must fail its full decode


@dataclass
class Split:
    """One split of a dataset: files relative to the dataset root, their labels, unusable files."""

    name: str
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Dataset:
    root: Path
    class_names: list[str]
    splits: dict[str, Split]


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk_files(folder: Path) -> list[Path]:
    """Every visible file under folder, sorted, hidden files and folders pruned."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if _visible(f))
    return sorted(found)


def _not_regular(f: Path) -> str:
    """Why f cannot be read as a file ('' when it is a regular file): FIFOs would block a reader forever."""
    if f.is_symlink() and not f.exists():
        return "broken symbolic link"
    if not f.is_file():
        return "not a regular file"
    return ""


def list_classes(split_dir: Path) -> list[str]:
    return sorted(e.name for e in split_dir.iterdir() if e.is_dir() and _visible(e.name))


def scan_split(root: Path, split: str, class_names: list[str]) -> Split:
    """Files of root/split/<class>/..., labelled by their index in class_names."""
    out = Split(split)
    split_dir = root / split
    for cls in list_classes(split_dir):
        if cls not in class_names:
            raise PipelineError(
                f"class folder {split_dir / cls} is not a class of the train split "
                f"({', '.join(class_names)}); remove it or add it to train"
            )
        for f in _walk_files(split_dir / cls):
            rel = f.relative_to(root).as_posix()
            problem = _not_regular(f)
            if problem:
                out.skipped.append((rel, problem))
            elif f.suffix.lower() in IMG_EXTENSIONS:
                out.paths.append(rel)
                out.labels.append(class_names.index(cls))
            else:
                out.skipped.append((rel, f"not an image extension ({f.suffix or 'none'})"))
    return out


def scan_dataset(root: str | os.PathLike, splits: list[str], allow_empty_class: bool = False) -> Dataset:
    """Discover classes from the first split and files of every split (plus `test` when present)."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"dataset folder {root} does not exist")
    splits = list(dict.fromkeys(splits + (["test"] if (root / "test").is_dir() else [])))
    for s in splits:
        if not (root / s).is_dir():
            raise PipelineError(f"split folder {root / s} is missing; create it or pass --splits")
    class_names = list_classes(root / splits[0])
    if not class_names:
        raise PipelineError(f"no class folders in {root / splits[0]}: expected {root / splits[0]}/<class>/<image>")
    scanned = {s: scan_split(root, s, class_names) for s in splits}
    for s, sp in scanned.items():
        if not sp.paths:
            raise PipelineError(f"split folder {root / s} has no images (looked for {', '.join(IMG_EXTENSIONS)} "
                                "in its class folders)")
    first = scanned[splits[0]]
    counts = np.bincount(np.asarray(first.labels, dtype=np.int64), minlength=len(class_names))
    empty = [c for c, n in zip(class_names, counts) if n == 0]
    if empty and not allow_empty_class:
        raise PipelineError(
            f"class folder {root / splits[0] / empty[0]} has no images; "
            "add images, remove the folder, or pass --allow-empty-class"
        )
    return Dataset(root, class_names, scanned)


def scan_files(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Images named on a command line (files or folders), and the (path, reason) of others."""
    files, skipped = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            candidates = _walk_files(p)
        elif p.exists():
            candidates = [p]
        else:
            skipped.append((str(p), "no such file"))
            continue
        for f in candidates:
            problem = _not_regular(f)
            if problem:
                skipped.append((str(f), problem))
            elif f.suffix.lower() in IMG_EXTENSIONS:
                files.append(f)
            else:
                skipped.append((str(f), f"not an image extension ({f.suffix or 'none'})"))
    return files, skipped


# --------------------------------------------------------------------------- decoding


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; 16-bit scaled (not clipped), transparency over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.asarray(im), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


class BadImage(ValueError):
    """A file that cannot be used as an image; the message is the reason shown to the user."""


def load_rgb(path: str | os.PathLike, draft: tuple[int, int] | None = None) -> Image.Image:
    """Fully decode an image to RGB, EXIF orientation applied. Raises BadImage with a reason.

    The decompression-bomb check uses the header only, before any pixel is decoded. A full decode
    (not Image.verify, which passes truncated JPEGs) is what finds damaged files.
    draft: a size hint for JPEG's DCT-domain downscaling (faster, changes pixels slightly).
    """
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        with Image.open(path) as im, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            w, h = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and w * h > limit:
                raise BadImage(f"image too large, possible decompression bomb ({w}x{h} pixels > limit {limit})")
            if draft and im.format == "JPEG":
                im.draft("RGB", draft)
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"image too large, possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise BadImage("not a readable image (PIL cannot identify it)") from None
    except FileNotFoundError:
        raise BadImage("file disappeared") from None
    except PermissionError:
        raise BadImage("permission denied") from None
    except IsADirectoryError:
        raise BadImage("is a directory") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on damaged files
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise BadImage(f"truncated image file ({msg})") from None
        raise BadImage(f"cannot decode image: {msg}") from None


# --------------------------------------------------------------------------- transforms


def eval_transform(resize: int = 256, crop: int = 224) -> T.Compose:
    """The tutorial's val transform (torchvision's ImageClassification preset for ResNet-18)."""
    from torchvision import transforms as T  # here, not at the top: importing torchvision costs ~1 s

    return T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(crop: int = 224) -> T.Compose:
    """The tutorial's train transform: RandomResizedCrop + horizontal flip."""
    from torchvision import transforms as T

    return T.Compose(
        [T.RandomResizedCrop(crop), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


TRANSFORM_SPEC = {
    "eval": "Resize(256, bilinear, antialias) CenterCrop(224) ToTensor Normalize(imagenet)",
    "views": "RandomResizedCrop(224, scale=(0.08,1), ratio=(3/4,4/3)) RandomHorizontalFlip ToTensor Normalize(imagenet)",
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "exif_transpose": True,
    "rgb": "16-bit scaled to 8, alpha over white",
}


class ImageFiles(torch.utils.data.Dataset):
    """Images of several splits behind one index: key (group, i) -> (x, views, group, i, reason).

    groups: one (files, names, views) per split. A bad file yields zeros and its reason instead of
    raising. With views > 0 an item also carries that many augmented tensors drawn from a generator
    seeded by (seed, name), so the views of an image do not depend on batching, workers, resume
    points or on which other files the folder holds.
    """

    def __init__(self, groups: list[tuple[list[str], list[str], int]], transform, seed: int = 0,
                 draft: bool = False, crop: int = 224, resize: int = 256):
        self.groups = groups
        self.transform = transform
        self.seed = seed
        self.draft = (resize, resize) if draft else None  # JPEG DCT scaling keeps the short side >= resize
        self.crop = crop
        self.view_transform = train_transform(crop)

    def __len__(self) -> int:
        return sum(len(g[0]) for g in self.groups)

    def __getitem__(self, key: tuple[int, int]):
        g, i = key
        files, names, views = self.groups[g]
        try:
            img = load_rgb(files[i], draft=self.draft)
        except BadImage as e:
            no_views = torch.zeros(views, 3, self.crop, self.crop) if views else torch.zeros(0)
            return torch.zeros(3, self.crop, self.crop), no_views, g, i, str(e)
        x = self.transform(img)
        if not views:
            return x, torch.zeros(0), g, i, ""
        # torchvision's random transforms draw from torch's global RNG: seed it per image.
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed * 1_000_003 + zlib.crc32(names[i].encode()))
        v = torch.stack([self.view_transform(img) for _ in range(views)])
        torch.random.set_rng_state(state)
        return x, v, g, i, ""


class LabelledImages(torch.utils.data.Dataset):
    """files[i] -> (transform(image), label). Indexed by (epoch, i): random transforms are seeded by
    (seed, epoch, i), so augmentation is the same whatever the workers, batching or resume point."""

    def __init__(self, files: list[str], labels: list[int], transform, seed: int = 0):
        self.files, self.labels, self.transform, self.seed = files, labels, transform, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        epoch, i = key
        img = load_rgb(self.files[i])  # files were validated before training
        state = torch.random.get_rng_state()
        torch.manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
        x = self.transform(img)
        torch.random.set_rng_state(state)
        return x, self.labels[i]


class EpochSampler(torch.utils.data.Sampler):
    """(epoch, index) keys for LabelledImages, in the order of torch's DistributedSampler for this rank:
    shuffled from seed + epoch (set_epoch each epoch) and padded to a multiple of the world size when
    shuffling (training); a plain rank stride with no padding when not (evaluation counts each image once).
    With world 1 this is an ordinary seeded shuffle."""

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.rank, self.world, self.epoch = n, shuffle, rank, world, 0
        self.inner = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                                         seed=seed) if shuffle else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.inner is not None:
            self.inner.set_epoch(epoch)

    def indices(self) -> list[int]:
        return list(self.inner) if self.inner is not None else list(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else len(range(self.rank, self.n, self.world))

    def __iter__(self):
        return iter([(self.epoch, i) for i in self.indices()])


class _Probe(torch.utils.data.Dataset):
    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            load_rgb(self.files[i])
            return ""
        except BadImage as e:
            return str(e)


def _as_list(batch):
    return batch


def find_unreadable(files: list[str], workers: int = 0) -> list[str]:
    """The decode error of each file ('' when it is usable), from a full decode in worker processes."""
    loader = torch.utils.data.DataLoader(_Probe(files), batch_size=16, num_workers=workers, collate_fn=_as_list)
    return [r for batch in loader for r in batch]
