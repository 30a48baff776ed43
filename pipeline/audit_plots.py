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

MAX_SUSPECTS = 24
MAX_PAIRS = 10


def _thumb(data_dir: Path | None, rel: str, size: int = 224):
    """(image array or None, why not)."""
    if data_dir is None:
        return None, "data folder not found"
    # PIL directly, not data.load_rgb: that module imports torch (seconds) and a thumbnail needs
    # no bomb checks on files the cache already decoded once
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


def _mosaic(tiles: list[tuple[str, str, str]], data_dir: Path | None, cols: int, tile_height: float):
    """A figure of (path, title, title colour) tiles, cols wide; returns it and its number of rows."""
    rows = -(-len(tiles) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, tile_height * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (rel, title, color) in zip(axes.flat, tiles):
        _tile(ax, data_dir, rel, title, color)
    return fig, rows


def suspects_png(audit, data_dir: Path | None, path: Path, cols: int = 6) -> None:
    tiles = [(r["path"], f"{r['split']}: given {r['label']}\nsuggested {r['suggested']}\nscore {r['score']:.3f}", "red")
             for r in audit.label_issues]
    tiles += [(r["path"], f"{r['split']}: outlier\nz {r['z']:.1f}, distance {r['score']:.3f}", "darkorange")
              for r in audit.outliers]
    tiles = [(rel, f"{Path(rel).name[:28]}\n{title}", color) for rel, title, color in tiles[:MAX_SUSPECTS]]
    if not tiles:
        _nothing(path, "no label issues or outliers\nabove the thresholds")
        return
    fig, rows = _mosaic(tiles, data_dir, cols, tile_height=2.9)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color="red", label="red title: likely label error (given vs suggested class)"),
                        Patch(color="darkorange", label="orange title: outlier (far from its k nearest neighbours)")],
               loc="upper center", ncol=2, frameon=False, bbox_to_anchor=(0.5, 1.0 + 0.25 / rows))
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
        color = "red" if cross else "black"
        _tile(left, data_dir, a, f"{a[-40:]}\n{kind}", color)
        _tile(right, data_dir, b, f"{b[-40:]}\n{'across splits' if cross else 'same split'}", color)
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
    fig, _ = _mosaic([(r["path"], f"{Path(r['path']).name[:28]}\n{r['split']}: {r['kind']}\nscore {r['score']:.3f}",
                       "navy") for r in tiles], data_dir, cols, tile_height=2.7)
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
