"""The audit's pictures: suspects.png (label issues and outliers), duplicates.png (copies and near pairs
side by side) and image_issues.png (photos not worth training on).
A file that cannot be read becomes a tile that says so; a picture that cannot be written becomes a note:
pictures never fail the audit."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from PIL import Image, ImageOps  # noqa: E402

from .fsio import atomic_output  # noqa: E402
from .heif import register_heif  # noqa: E402
from .plots import short_label, short_path  # noqa: E402

MAX_SUSPECTS = 24
MAX_PAIRS = 10


def _thumb(data_dir: Path | None, rel: str, size: int = 224):
    """(image array or None, why not)."""
    if data_dir is None:
        return None, "data folder not found"
    # PIL directly, not data.load_rgb: that module imports torch (seconds) and a thumbnail needs
    # no bomb checks on files the cache already decoded once
    register_heif()  # HEIC photos are drawn too
    try:
        with Image.open(data_dir / rel) as im:
            im.draft("RGB", (size, size))
            img = ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        return None, "image missing"
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        return None, f"unreadable: {str(e)[:40]}"
    img.thumbnail((size, size))
    return np.asarray(img), ""


def _tile(ax, data_dir, rel: str, title: str, color: str = "black") -> None:
    ax.axis("off")
    img, why = _thumb(data_dir, rel)
    if img is not None:
        ax.imshow(img)
    else:
        ax.text(0.5, 0.5, f"{why}\n{rel}", ha="center", va="center", fontsize=7, wrap=True)
    ax.set_title(title, fontsize=8, color=color)


def _nothing(path: Path, what: str) -> None:
    """A picture that says nothing was found: it replaces an older audit's picture in the same folder,
    which would otherwise show findings this audit no longer has."""
    fig, ax = plt.subplots(figsize=(4, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, what, ha="center", va="center")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    try:
        with atomic_output(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90, bbox_inches="tight")
    finally:
        plt.close(fig)


TITLE_CHARS = 34  # characters of an 8-point title line that fit a 2.4-inch tile
TILE_W, IMAGE_H, LINE_H = 2.4, 2.1, 0.16  # inches: a tile's width, its image's height, a title line


def tile_title(rel: str, lines: list[str]) -> str:
    """A tile's title: the photo as class folder/file name (the same name in two classes is two photos),
    then the given lines, each elided in the middle to fit the tile (no title overlaps its neighbour)."""
    return "\n".join([short_path(rel, TITLE_CHARS)] + [short_label(t, TITLE_CHARS) for t in lines])


def _mosaic(tiles: list[tuple[str, str, str]], data_dir: Path | None, cols: int, title_lines: int):
    """A figure of (path, title, title colour) tiles, cols wide, laid out in inches: each row is its titles'
    band (title_lines lines) over its images, so titles never run into the row above and no band is left
    empty at the top. Returns the figure and its number of rows."""
    rows = -(-len(tiles) // cols)
    band = LINE_H * title_lines + 0.1
    height = rows * (band + IMAGE_H) + 0.05
    fig, axes = plt.subplots(rows, cols, figsize=(TILE_W * cols, height), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.05 / height, top=1 - band / height, wspace=0.06,
                        hspace=band / IMAGE_H)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (rel, title, color) in zip(axes.flat, tiles):
        _tile(ax, data_dir, rel, title, color)
    return fig, rows


def suspects_png(audit, data_dir: Path | None, path: Path, cols: int = 6) -> None:
    tiles = [(r["path"], [f"{r['split']}: given {r['label']}", f"suggested {r['suggested']}", f"score {r['score']:.3f}"],
              "red") for r in audit.label_issues]
    tiles += [(r["path"], [f"{r['split']}: outlier", f"z {r['z']:.1f}, distance {r['score']:.3f}"], "darkorange")
              for r in audit.outliers]
    tiles = [(rel, tile_title(rel, lines), color) for rel, lines, color in tiles[:MAX_SUSPECTS]]
    if not tiles:
        _nothing(path, "no label issues or outliers\nabove the thresholds")
        return
    fig, rows = _mosaic(tiles, data_dir, cols, title_lines=4)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="red", label="red title: likely label error (given vs suggested class)"),
                        Patch(color="darkorange", label="orange title: outlier (far from its k nearest neighbours)")],
               loc="lower center", ncol=2, frameon=False, bbox_to_anchor=(0.5, 1.0))
    _save(fig, path)


def _duplicate_rows(audit) -> list[tuple[str, str, str, bool]]:
    """(left file, right file, what, across splits): groups of copies first (two of their files, of two
    splits when the group spans them), then near pairs; MAX_PAIRS rows at most."""
    out = []
    for g in audit.copy_groups:
        a, b = g["files"][0], g["files"][1]  # listed round robin over splits: a leak shows both sides
        kind = "exact copies" if g["exact"] else "same features"
        out.append((a["path"], b["path"], f"{kind}, {g['count']} files", g["cross_split"]))
    out += [(d["a"], d["b"], f"near {d['similarity']:.4f}", d["cross_split"]) for d in audit.duplicates]
    return out[:MAX_PAIRS]


def duplicates_png(audit, data_dir: Path | None, path: Path) -> None:
    pairs = _duplicate_rows(audit)
    if not pairs:
        _nothing(path, "no duplicates above the threshold")
        return
    fig, axes = plt.subplots(len(pairs), 2, figsize=(6, 3.1 * len(pairs)), squeeze=False)
    for (left, right), (a, b, kind, cross) in zip(axes, pairs):
        color = "red" if cross else "black"  # split/class/name: which split each side is in shows
        _tile(left, data_dir, a, f"{short_path(a, 40, parts=3)}\n{kind}", color)
        _tile(right, data_dir, b, f"{short_path(b, 40, parts=3)}\n{'across splits' if cross else 'same split'}", color)
    _save(fig, path)


def image_issues_png(audit, data_dir: Path | None, path: Path, cols: int = 6) -> None:
    """Photos not worth training on: the first few of each kind, titled by kind and score."""
    by_kind: dict[str, list[dict]] = {}
    for r in audit.image_issues:
        by_kind.setdefault(r["kind"], []).append(r)
    per = max(1, MAX_SUSPECTS // max(1, len(by_kind)))
    tiles = [r for rs in by_kind.values() for r in rs[:per]][:MAX_SUSPECTS]
    if not tiles:
        _nothing(path, "no photos found dark, light, blurry, low in information,\nodd in size or shape, or grayscale")
        return
    fig, _ = _mosaic([(r["path"], tile_title(r["path"], [f"{r['split']}: {r['kind']}", f"score {r['score']:.3f}"]),
                       "navy") for r in tiles], data_dir, cols, title_lines=3)
    _save(fig, path)


DRAW = {"suspects.png": suspects_png, "duplicates.png": duplicates_png, "image_issues.png": image_issues_png}


def audit_pictures(audit, data_dir: Path | None, out: Path, names) -> tuple[list[str], list[str]]:
    """Writes the pictures `names` (of DRAW; a line saying so when one has nothing to show); returns the names
    drawn and a note per picture that failed (a full disk, a broken file): a picture never costs audit.json or
    report.txt."""
    drawn, notes = [], []
    for name in names:
        try:
            DRAW[name](audit, data_dir, out / name)
            drawn.append(name)
        except Exception as e:  # MemoryError included: the picture is lost, the audit is not
            first = str(e).splitlines()[0][:200] if str(e) else ""
            notes.append(f"{name} not drawn: {type(e).__name__}: {first}")
    return drawn, notes
