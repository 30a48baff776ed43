"""Dataset discovery, safe image decoding and the tutorial's transforms.

Discovery is pure and deterministic: sorted classes, sorted files, hidden entries ignored.
Files that cannot be used are never fatal: they become (path, reason) rows in `skipped`.
"""
from __future__ import annotations

import functools
import os
import stat
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from . import PipelineError
from .heif import AVIF_EXTENSIONS, HEIF_EXTENSIONS, missing_decoder, register_heif
from .image_stats import FIELDS as STAT_FIELDS
from .image_stats import measure as measure_image
from .image_stats import unmeasured_row as _unmeasured_row
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess  # noqa: F401  (re-exported)
from .splits import DEFAULT_SPLITS, FLAT, FOLDERS, SPLIT_FOLDERS, LayoutError, LayoutFlagError, SplitSpec, assign, \
    check_class_split, flat_spec, membership_digest
from .text import is_utf8, printable

# torchvision's ImageFolder list, plus the phones' HEIC and AVIF (pipeline/heif.py); matched case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp") + HEIF_EXTENSIONS + \
    AVIF_EXTENSIONS
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must fail its full decode
UNMEASURED = _unmeasured_row()


@dataclass
class Split:
    """One split of a dataset: files relative to the dataset root, their labels, unusable files."""

    name: str
    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # bytes, per path (os.stat through links)
    mtimes: list[int] = field(default_factory=list)  # st_mtime_ns, per path: a changed file is re-extracted

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ScannedData:
    """What scan_dataset found: classes, the files of every split, and how the split was made."""

    root: Path
    class_names: list[str]
    splits: dict[str, Split]
    split: SplitSpec = field(default_factory=SplitSpec)

    def split_record(self) -> dict:
        """What caches and run folders record about the split: the spec and a digest of which file is
        in which split (equal digests: the very same split)."""
        return {**asdict(self.split), "digest": membership_digest({s: sp.paths for s, sp in self.splits.items()})}


# files that operating systems write beside photos (thumbnail caches, folder settings): ignored like .DS_Store,
# never counted as skipped images (matched case-insensitively)
SYSTEM_FILES = frozenset({"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r",
                          "$recycle.bin", "system volume information", "__macosx"})


def _visible(name: str) -> bool:
    return not name.startswith(".") and name.lower() not in SYSTEM_FILES


PARTIAL_SUFFIX = ".partial"  # an extract's work folder (CACHE.partial/ with a plan.json)


def _tool_folder(path: Path) -> bool:
    """The tool's own unfinished-extract folder, when a cache was written inside the data folder."""
    return path.name.endswith(PARTIAL_SUFFIX) and (path / "plan.json").is_file()


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def link_refusal(target: str, inside: str | None, scanned: tuple[str, ...], visited: set[str]) -> str:
    """Why a link to the folder `target` (a real path) is not followed ('' when it is).

    A folder link is followed only when its target lies inside DATA_DIR (`inside`), is not a folder the
    scan reads anyway (`scanned`: the split folders; this also catches every link to an ancestor, i.e.
    every loop) and was not reached before (`visited`): no file is read twice, nothing outside is read."""
    if inside is not None and not _within(target, inside):
        return "link to a folder outside DATA_DIR (not followed)"
    if any(_within(target, s) or _within(s, target) for s in scanned):
        return "link to a folder that is scanned anyway (a loop or a duplicate; not followed)"
    if target in visited:
        return "link to a folder already scanned through another path (not followed)"
    return ""


def _walk_files(folder: Path, inside: Path | None = None, scanned: tuple[Path, ...] = (),
                visited: set[str] | None = None) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Every visible file under folder (sorted), and (path, reason) of each folder link not followed.

    Links to files are followed wherever they point (where a file link points is the user's choice);
    links to folders only as link_refusal allows, so a walk never loops, never finds a file twice and
    never leaves `inside`. Hidden entries and the tool's own .partial folders are ignored.
    visited: real paths of the folders reached so far, shared by the walks of one scan."""
    inside_real = os.path.realpath(inside) if inside is not None else None
    roots = tuple(os.path.realpath(s) for s in scanned) or (os.path.realpath(folder),)
    visited = set() if visited is None else visited
    visited.add(os.path.realpath(folder))
    found: list[Path] = []
    refused: list[tuple[Path, str]] = []

    def walk(d: Path) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            refused.append((d, f"folder cannot be listed ({e.strerror or e})"))
            return
        for e in entries:
            path = Path(e.path)
            if not _visible(e.name):
                continue
            try:
                is_dir = e.is_dir()  # follows links; a broken link is not a dir
            except OSError:
                is_dir = False
            if not is_dir:
                found.append(path)
                continue
            if _tool_folder(path):
                continue
            target = os.path.realpath(path)
            if e.is_symlink():
                why = link_refusal(target, inside_real, roots, visited)
                if why:
                    refused.append((path, why))
                    continue
            elif target in visited:  # a real folder already reached through a link
                continue
            visited.add(target)
            walk(path)

    walk(folder)
    return sorted(found), refused


def _not_regular(f: Path) -> str:
    """Why f cannot be read as a file ('' when it is a regular file): FIFOs would block a reader forever."""
    if f.is_symlink() and not f.exists():
        return "broken symbolic link"
    if not f.is_file():
        return "not a regular file"
    return ""


def _file_stat(f: Path) -> tuple[str, os.stat_result | None]:
    """(why f cannot be read as a file or '', its stat through links). One stat per file: the size and
    mtime_ns recorded in the cache come from it."""
    try:
        st = os.stat(f)
    except FileNotFoundError:
        return ("broken symbolic link" if f.is_symlink() else "file disappeared"), None
    except OSError as e:
        return f"cannot stat ({e.strerror or e})", None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file", None
    return "", st


def list_classes(split_dir: Path) -> list[str]:
    names = sorted(e.name for e in split_dir.iterdir() if e.is_dir() and _visible(e.name) and not _tool_folder(e))
    for n in names:
        if not is_utf8(n):
            raise PipelineError(f"class folder {printable(str(split_dir / n))} has a name that is not valid UTF-8; "
                                "rename it")
    return names


def _class_folder(root: Path, split_dir: Path, cls: str, scanned: tuple[Path, ...]) -> Path:
    """split_dir/cls, refused (one line) when it is a link that leaves DATA_DIR or overlaps another split."""
    folder = split_dir / cls
    if folder.is_symlink():
        why = link_refusal(os.path.realpath(folder), os.path.realpath(root),
                           tuple(os.path.realpath(s) for s in scanned if s != split_dir), set())
        if why:
            raise PipelineError(f"class folder {printable(str(folder))} is a {why.split(' (')[0]}; "
                                "copy the images in or link each file instead")
    return folder


def scan_split(root: Path, split: str, class_names: list[str], splits: tuple[str, ...] = (),
               visited: set[str] | None = None) -> Split:
    """Files of root/split/<class>/..., labelled by their index in class_names.

    splits: every split of the scan; a folder link into any of them is not followed. visited: shared by
    the splits of one scan, so a folder linked from two places is read once (no file twice)."""
    visited = set() if visited is None else visited
    out = Split(split)
    split_dir = root / split
    scanned = tuple(root / s for s in dict.fromkeys((split, *splits)))
    for cls in list_classes(split_dir):
        if cls not in class_names:
            raise PipelineError(
                f"class folder {printable(str(split_dir / cls))} is not a class of the train split "
                f"({', '.join(map(printable, class_names))}); remove it or add it to train"
            )
        files, refused = _walk_files(_class_folder(root, split_dir, cls, scanned), root, scanned, visited)
        out.skipped += [(printable(p.relative_to(root).as_posix()), why) for p, why in refused]
        for f in files:
            rel = f.relative_to(root).as_posix()
            if not is_utf8(rel):  # HDF5 stores UTF-8 only; the name is shown escaped
                out.skipped.append((printable(rel), "file name is not valid UTF-8 (rename it)"))
                continue
            problem, st = _file_stat(f)
            if not problem and f.suffix.lower() not in IMG_EXTENSIONS:
                problem = f"not an image extension ({f.suffix or 'none'})"
            if problem:
                out.skipped.append((rel, problem))
                continue
            out.paths.append(rel)
            out.labels.append(class_names.index(cls))
            out.sizes.append(st.st_size)
            out.mtimes.append(st.st_mtime_ns)
    out.skipped.sort()
    return out


def _holds_images(folder: Path) -> bool:
    return any(f.suffix.lower() in IMG_EXTENSIONS for f in _walk_files(folder, folder)[0])


def detect_layout(root: Path, splits: list[str], flat_flags: bool) -> str:
    """FOLDERS when root holds split folders (train/, val/, test/ or those of --splits), FLAT when it holds
    class folders only. Class folders beside split folders are refused: which files would be val?"""
    names = set(SPLIT_FOLDERS) | set(splits)
    dirs = list_classes(root)
    split_dirs = [d for d in dirs if d in names]
    if not split_dirs:
        return FLAT
    beside = [d for d in dirs if d not in names and _holds_images(root / d)]
    if beside:
        raise LayoutError(
            f"{root} mixes two layouts: split folders ({', '.join(d + '/' for d in split_dirs)}) and class folders "
            f"beside them ({', '.join(d + '/' for d in beside)}); use one: move those class folders into "
            f"{'/ and '.join(split_dirs)}/ (your split), or move the split folders' class folders up into {root} "
            "(the tool splits them, see --val-fraction)")
    if flat_flags:
        raise LayoutFlagError(f"{root} has its own split folders ({', '.join(d + '/' for d in split_dirs)}), so "
                          "--val-fraction/--test-fraction/--split-seed do not apply; drop them, or point at a folder "
                          "of class folders")
    return FOLDERS


def scan_flat(root: Path, spec: SplitSpec, allow_empty_class: bool = False) -> ScannedData:
    """root/<class>/... split into train/val(/test) file by file (splits.assign), checked per class."""
    class_names = list_classes(root)
    if not class_names:
        raise PipelineError(f"no class folders in {root}: expected {root}/<class>/<image> "
                            "(or train/ and val/ folders of class folders)")
    every = scan_split(root, "", class_names)  # root/<class>/... with paths relative to root
    out = {s: Split(s) for s in spec.splits()}
    for rel, label, size, mtime in zip(every.paths, every.labels, every.sizes, every.mtimes):
        sp = out[assign(rel, spec)]
        sp.paths.append(rel)
        sp.labels.append(label)
        sp.sizes.append(size)
        sp.mtimes.append(mtime)
    for rel, reason in every.skipped:
        out[assign(rel, spec)].skipped.append((rel, reason))
    for ci, cls in enumerate(class_names):
        counts = {s: sp.labels.count(ci) for s, sp in out.items()}
        if sum(counts.values()) == 0:
            if allow_empty_class:
                continue
            raise EmptyClassError(empty_class_message(root / cls))
        check_class_split(cls, counts, spec)
    return ScannedData(root, class_names, out, spec)


def scan_dataset(root: str | os.PathLike, splits: list[str], allow_empty_class: bool = False,
                 val_fraction: float | None = None, test_fraction: float | None = None,
                 split_seed: int = 0) -> ScannedData:
    """Discover classes and the files of every split. A folder of class folders is split by the tool
    (scan_flat); a folder of split folders keeps its own split: classes from the first split, files of
    every split (plus `test` when present)."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"dataset folder {root} does not exist")
    flat_flags = val_fraction is not None or test_fraction is not None or split_seed != 0
    if detect_layout(root, list(splits), flat_flags) == FLAT:
        if tuple(splits) != DEFAULT_SPLITS:  # the default names exactly the train and val a flat split gives
            raise LayoutFlagError(
                f"{root} holds class folders only (no train/ or val/ folders), so --splits does not apply: the tool "
                "splits it (see --val-fraction); drop --splits, or give the folder its own train/ and val/ folders")
        return scan_flat(root, flat_spec(val_fraction, test_fraction, split_seed), allow_empty_class)
    splits = list(dict.fromkeys(splits + (["test"] if (root / "test").is_dir() else [])))
    for s in splits:
        if not (root / s).is_dir():
            raise PipelineError(f"split folder {root / s} is missing; create it or pass --splits")
    class_names = list_classes(root / splits[0])
    if not class_names:
        raise PipelineError(f"no class folders in {root / splits[0]}: expected {root / splits[0]}/<class>/<image>")
    visited: set[str] = set()  # folders reached so far, across splits: a linked folder is read once
    scanned = {s: scan_split(root, s, class_names, tuple(splits), visited) for s in splits}
    for s, sp in scanned.items():
        if not sp.paths:
            raise PipelineError(f"split folder {root / s} has no images (looked for {', '.join(IMG_EXTENSIONS)} "
                                "in its class folders)")
    first = scanned[splits[0]]
    counts = np.bincount(np.asarray(first.labels, dtype=np.int64), minlength=len(class_names))
    empty = [c for c, n in zip(class_names, counts) if n == 0]
    if empty and not allow_empty_class:
        raise EmptyClassError(empty_class_message(root / splits[0] / empty[0]))
    return ScannedData(root, class_names, scanned, SplitSpec(FOLDERS))


class EmptyClassError(PipelineError):
    """A class with no usable train image (none found, or none that decodes), without --allow-empty-class."""


def empty_class_message(folder: Path, what: str = "no images") -> str:
    return f"class folder {folder} has {what}; add images, remove the folder, or pass --allow-empty-class"


def check_usable_classes(data: ScannedData, train_labels, skipped=(), allow_empty_class: bool = False) -> None:
    """The scan's empty-class check again after the decode pass: a class whose train files all failed to
    decode is as empty as a class folder without images (it would train on nothing and report support 0).
    train_labels: labels of the first split's files that decoded; skipped: (path, reason) of those that did
    not (one of the class's is quoted)."""
    if allow_empty_class:
        return
    usable = set(int(y) for y in train_labels)
    first = next(iter(data.splits))
    flat = data.split.layout == FLAT
    for ci, cls in enumerate(data.class_names):
        if ci in usable:
            continue
        folder = data.root / cls if flat else data.root / first / cls
        prefix = folder.relative_to(data.root).as_posix() + "/"
        n = data.splits[first].labels.count(ci)  # >= 1: the scan refused a class without any
        example = next((f", e.g. {path}: {reason}" for path, reason in skipped if str(path).startswith(prefix)), "")
        what = f"no {'train ' if flat else ''}images that decode (all {n} failed{example})"
        raise EmptyClassError(empty_class_message(folder, what))


def scan_preview_images(root: str | os.PathLike, split: str = "train") -> tuple[list[str], Split]:
    """(class names, the images a preview draws from): the train split of a folder with its own split; every
    image of a flat folder (which of them train is a choice of flags preview does not have, and a class
    too small to split is still worth a look)."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"dataset folder {root} does not exist")
    if detect_layout(root, [split], False) == FLAT:
        class_names = list_classes(root)
        if not class_names:
            raise PipelineError(f"no class folders in {root}: expected {root}/<class>/<image> "
                                "(or train/ and val/ folders of class folders)")
        return class_names, scan_split(root, "", class_names)
    data = scan_dataset(root, [split], allow_empty_class=True)
    return data.class_names, data.splits[split]


def scan_files(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Images named on a command line (files or folders), and the (path, reason) of others."""
    files, skipped = [], []
    for item in inputs:
        if not str(item):  # Path('') is the current folder: an unset variable would scan the cwd
            skipped.append(("", "empty path (names no file)"))
            continue
        p = Path(item)
        if p.is_dir():
            candidates, refused = _walk_files(p)
            skipped += [(printable(str(f)), why) for f, why in refused]
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


FULL_SIZE = "tlearn_full_size"  # load_rgb's note in Image.info: the photo's size before any draft


def full_size(img: Image.Image) -> tuple[int, int]:
    """The (width, height) of the photo img was decoded from by load_rgb (its own size otherwise)."""
    return img.info.get(FULL_SIZE, img.size)


class BadImage(ValueError):
    """A file that cannot be used as an image; the message is the reason shown to the user."""


def load_rgb(path: str | os.PathLike, draft: tuple[int, int] | None = None, exif: bool = True) -> Image.Image:
    """Fully decode an image to RGB, EXIF orientation applied (unless exif=False). Raises BadImage with a reason.
    The photo's own (width, height), in that orientation whatever the draft decoded, is full_size(image).

    The decompression-bomb check uses the header only, before any pixel is decoded. A full decode
    (not Image.verify, which passes truncated JPEGs) is what finds damaged files.
    draft: a size hint for JPEG's DCT-domain downscaling (Preprocess.draft_size: faster, changes pixels
    slightly); applied before the EXIF turn, which keeps the short side the short side.
    """
    register_heif()  # HEIC is read by content, whatever the file's name
    try:
        if os.path.getsize(path) == 0:
            raise BadImage("empty file (0 bytes)")
        missing = missing_decoder(Path(path).suffix)
        if missing:
            raise BadImage(missing)
        with Image.open(path) as im, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            w, h = im.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and w * h > limit:
                raise BadImage(f"image too large, possible decompression bomb ({w}x{h} pixels > limit {limit})")
            if draft and im.format == "JPEG":
                im.draft("RGB", draft)
            im.load()
            drafted = im.size
            if exif:
                im = ImageOps.exif_transpose(im)
            turned = im.size != drafted  # a quarter turn swapped width and height
            out = _to_rgb(im)
            out.info[FULL_SIZE] = (h, w) if turned else (w, h)
            return out
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

_PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def resize_crop_pil(img: Image.Image, spec: Preprocess) -> Image.Image:
    """Resize (short side) + CenterCrop of spec, exactly torchvision's T.Resize + T.CenterCrop on PIL images.
    An absurdly elongated image (spec.bounded) is resampled straight from the crop's source region instead,
    so the work and memory are those of the crop, not of a huge intermediate."""
    w, h = img.size
    resample = _PIL_RESAMPLE[spec.interpolation]
    if spec.bounded(w, h):
        # PIL's box resize reads the filter's support outside the box too: the same pixels up to rounding
        return img.resize((spec.crop, spec.crop), resample, box=spec.source_box(w, h))
    rw, rh = spec.resized_size(w, h)
    if (rw, rh) != (w, h):  # torchvision returns the image itself when the size is already right
        img = img.resize((rw, rh), resample)
    left, top = spec.crop_offset(w, h)
    return img.crop((left, top, left + spec.crop, top + spec.crop))


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> 3 x H x W uint8 tensor (ToTensor without the float conversion)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


@functools.lru_cache(maxsize=16)
def _norm_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as 1 x 3 x 1 x 1 tensors on device, made once: building them per batch on a GPU is two
    blocking host-to-device copies (two full syncs) per batch."""
    with torch.inference_mode(False):  # plain tensors, usable inside and outside inference mode
        return (torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(device),
                torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(device))


def normalize_batch(x: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32 normalised, on x's device, in one batched pass. The same ops as
    ToTensor (div 255) + Normalize (sub mean, div std), so on the CPU it is bit for bit the reference."""
    mean, std = _norm_constants(spec.mean, spec.std, x.device)
    return x.to(torch.float32).div_(255).sub_(mean).div_(std)


class _Uint8Crop:
    """PIL image -> 3 x crop x crop uint8: what the decode workers ship (150 KB, not 600 KB of floats)."""

    def __init__(self, spec: Preprocess):
        self.spec = spec

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return pil_to_uint8(resize_crop_pil(img, self.spec))


class _ResizeCrop:
    def __init__(self, spec: Preprocess):
        self.spec = spec

    def __call__(self, img: Image.Image) -> Image.Image:
        return resize_crop_pil(img, self.spec)

    def __repr__(self) -> str:
        return f"ResizeCrop({self.spec.resize}, {self.spec.crop}, {self.spec.interpolation})"


def uint8_transform(spec: Preprocess | None = None) -> _Uint8Crop:
    return _Uint8Crop(spec or Preprocess())


class Transform:
    """PIL image -> steps applied in order (torchvision's Compose, without importing torchvision)."""

    def __init__(self, *steps):
        self.steps = steps

    def __call__(self, img):
        for step in self.steps:
            img = step(img)
        return img

    def __repr__(self) -> str:
        return f"Transform{self.steps!r}"


class _Normalized:
    """PIL image -> float32 3 x H x W: torchvision's ToTensor + Normalize, by normalize_batch (the same ops)."""

    def __init__(self, spec: Preprocess):
        self.spec = spec

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return normalize_batch(pil_to_uint8(img)[None], self.spec)[0]

    def __repr__(self) -> str:
        return f"Normalized(mean={self.spec.mean}, std={self.spec.std})"


def _random_crop_flip(crop: int) -> tuple:
    """torchvision's RandomResizedCrop(crop) (bilinear, scale (0.08, 1), ratio (3/4, 4/3)) and
    RandomHorizontalFlip(0.5) on PIL images. They draw from torch's global RNG, which LabelledImages and
    ImageFiles seed per image. Imported here: torchvision costs ~2 s (torch._dynamo), which finetune and
    --views can afford; extract and predict, whose Resize + CenterCrop is written out above, never pay it."""
    from torchvision import transforms as T

    return T.RandomResizedCrop(crop), T.RandomHorizontalFlip()


def eval_transform(spec: Preprocess | int | None = None, crop: int | None = None) -> Transform:
    """The tutorial's val transform (Resize 256, CenterCrop 224, ToTensor, Normalize) built from a spec;
    eval_transform(resize, crop) is kept for callers that pass sizes."""
    if not isinstance(spec, Preprocess):
        spec = Preprocess(**({"resize": spec} if spec else {}), **({"crop": crop} if crop else {}))
    return Transform(_ResizeCrop(spec), _Normalized(spec))


def view_transform(spec: Preprocess | None = None) -> Transform:
    """The tutorial's train augmentation without ToTensor/Normalize (uint8 out; normalised on the device)."""
    return Transform(*_random_crop_flip((spec or Preprocess()).crop), pil_to_uint8)


def train_transform(crop: int = 224) -> Transform:
    """The tutorial's train transform: RandomResizedCrop + horizontal flip, ToTensor, Normalize."""
    return Transform(*_random_crop_flip(crop), _Normalized(Preprocess()))


# The default spec's record: what caches and runs made before the spec existed carry (kept for readers).
TRANSFORM_SPEC = Preprocess().record()


class ImageFiles(torch.utils.data.Dataset):
    """Images of several splits behind one index: key (group, i) -> (x, views, group, i, reason), where x
    is the 3 x crop x crop uint8 crop (views: K x 3 x crop x crop uint8); normalisation happens on the
    extraction device, batched (normalize_batch).

    groups: one (files, names, views) per split. A bad file yields zeros and its reason instead of
    raising. The last element is the image's measures (image_stats.measure; NaN for a bad file). With views > 0 an item also carries that many augmented crops drawn from a generator
    seeded by (seed, view key): the name, or (extract) the file's sha256, so the views of an image do not
    depend on batching, workers, resume points, on which other files the folder holds or (keyed by
    content) on the image's path and split.
    """

    def __init__(self, groups: list[tuple[list[str], list[str], int]], spec: Preprocess | None = None, seed: int = 0):
        self.groups = groups
        self.spec = spec = spec or Preprocess()
        self.seed = seed
        self.draft = spec.draft_size()  # JPEGs: DCT scaling keeps the short side >= spec.draft x resize
        self.transform = uint8_transform(spec)
        # torchvision's random transforms (imported when built): only when some group has views
        self.view_transform = view_transform(spec) if any(g[2] for g in groups) else None

    def __len__(self) -> int:
        return sum(len(g[0]) for g in self.groups)

    def __getitem__(self, key: tuple[int, int]):
        return self.item(key)

    def item(self, key: tuple[int, int], view_key: str | None = None):
        """The item of key; its views drawn from (seed, view_key or the file's name)."""
        g, i = key
        files, names, views = self.groups[g]
        c = self.spec.crop
        try:
            img = load_rgb(files[i], draft=self.draft, exif=self.spec.exif)
        except BadImage as e:
            no_views = torch.zeros(views, 3, c, c, dtype=torch.uint8) if views else torch.zeros(0, dtype=torch.uint8)
            return torch.zeros(3, c, c, dtype=torch.uint8), no_views, g, i, str(e), torch.from_numpy(UNMEASURED)
        x = self.transform(img)
        stats = torch.from_numpy(measure_image(img, x.numpy()))  # the audit's photo checks (image_stats)
        # the photo's own width and height, not its drafted decode's
        stats[STAT_FIELDS.index("width")], stats[STAT_FIELDS.index("height")] = full_size(img)
        if not views:
            return x, torch.zeros(0, dtype=torch.uint8), g, i, "", stats
        # torchvision's random transforms draw from torch's global RNG: seed it per image.
        state = torch.random.get_rng_state()
        torch.manual_seed(self.seed * 1_000_003 + zlib.crc32((view_key or names[i]).encode()))
        v = torch.stack([self.view_transform(img) for _ in range(views)])
        torch.random.set_rng_state(state)
        return x, v, g, i, "", stats


class ImageChanged(PipelineError):
    """A file that passed the decode check could not be read when its batch came (it changed on disk since,
    or a verdict vouched for it wrongly)."""


def worker_error_line(e: BaseException) -> str:
    """The error's own words: a DataLoader worker re-raises with its whole traceback as the message,
    ending in '<module>.<Class>: <words>'; a message raised in this process is returned as it is."""
    text = str(e).strip()
    prefix = f"{type(e).__module__}.{type(e).__name__}: "
    if text.startswith("Caught ") and prefix in text:
        return text.rpartition(prefix)[2]
    return text


def image_seed(seed: int, epoch: int, i: int) -> int:
    """The seed of image i's augmentation in an epoch: distinct per (seed, epoch, i), reduced modulo 2**64
    into torch's seed range (unchanged below it), so every --seed the option accepts works."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + i) % 2**64


class LabelledImages(torch.utils.data.Dataset):
    """files[i] -> (transform(image), label). Indexed by (epoch, i): random transforms are seeded by
    (seed, epoch, i), so augmentation is the same whatever the workers, batching or resume point.
    draft: load_rgb's JPEG size hint (Preprocess.draft_size; None: full-size decode)."""

    def __init__(self, files: list[str], labels: list[int], transform, seed: int = 0,
                 draft: tuple[int, int] | None = None):
        self.files, self.labels, self.transform, self.seed, self.draft = files, labels, transform, seed, draft

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key):
        epoch, i = key
        try:
            img = load_rgb(self.files[i], draft=self.draft)  # files were validated before training
        except BadImage as e:
            raise ImageChanged(f"{self.files[i]} passed the decode check but cannot be read now ({e}); fix or "
                               "remove it and run again") from None
        state = torch.random.get_rng_state()
        torch.manual_seed(image_seed(self.seed, epoch, i))
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
