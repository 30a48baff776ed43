"""The tutorial's pictures, as files: curves.png, confusion.png, predictions.png, and the preview grid.
Plots only format results that the stages computed.

Torch-free (numpy, PIL and matplotlib's object API, no pyplot). Pictures are a courtesy: draw_pictures
never raises, it returns a note for each picture it could not draw.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .fsio import atomic_output
from .heif import register_heif

DPI = 100
MATRIX_CLASSES = 25  # more classes than this: confusion.png shows the ones with the most errors
THUMB = 224  # predictions.png tile size in pixels (the model's crop)
MISSING = "image not found"


def import_in_background() -> None:
    """Import what drawing needs (matplotlib's Figure and Agg canvas, ~0.5 s) on a daemon thread, for a command
    whose main thread mostly waits in torch ops meanwhile (finetune's epochs). Only once no more processes
    will be forked: a child forked while the thread holds an import lock could hang on its first import."""
    import threading

    def work():
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401

    threading.Thread(target=work, name="tlearn-import-matplotlib", daemon=True).start()


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)  # no pyplot: no global figure registry, nothing to close
    return fig


def _save(fig, path: Path, **savefig) -> None:
    # the layout was fixed when the figure was made; bbox_inches="tight" would render it twice
    with atomic_output(path, suffix=Path(path).suffix) as tmp:
        # PNG compress level 1: a third of level 6's time (the PDF and SVG writers take no pil_kwargs);
        # savefig: the caller's own keywords (preview's mark)
        png = {"pil_kwargs": {"compress_level": 1}} if Path(path).suffix.lower() == ".png" else {}
        fig.savefig(tmp, dpi=DPI, **{**png, **savefig})


def curves_png(history: list[dict], path: Path, kept_epoch: int | None = None) -> None:
    _save(curves_figure(history, kept_epoch), path)


def curves_figure(history: list[dict], kept_epoch: int | None = None):
    """Loss and accuracy per epoch (whole-epoch ticks); kept_epoch: the epoch whose weights the run kept,
    marked by a dashed line."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig = _figure(10, 4)
    a, b = fig.subplots(1, 2)
    for key, ax in (("loss", a), ("acc", b)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "o-", label="val")
        if kept_epoch is not None and kept_epoch >= 0:
            ax.axvline(kept_epoch, color="0.3", linestyle="--", linewidth=1, label=f"kept: epoch {kept_epoch}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
        ax.grid(alpha=0.3)
    a.set_title("loss per epoch")
    b.set_title("accuracy per epoch")
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.22)
    return fig


def matrix_view(matrix, class_names: list[str], limit: int = MATRIX_CLASSES) -> tuple[np.ndarray, list[str], str]:
    """(matrix, names, note) to draw from a confusion record (dense rows or metrics.json's sparse entries):
    all classes up to limit; beyond that the limit classes with the most errors (wrong predictions from or
    into them), in their original order, and a note saying so. Linear in the record's nonzero cells."""
    from .metrics import confusion_entries

    t, p, c, _ = confusion_entries(matrix)
    classes = len(class_names)
    if classes <= limit:
        keep = np.arange(classes)
        note = ""
    else:
        wrong = t != p
        errors = (np.bincount(t[wrong], weights=c[wrong], minlength=classes)
                  + np.bincount(p[wrong], weights=c[wrong], minlength=classes))
        keep = np.sort(np.argsort(-errors, kind="stable")[:limit])
        note = f"{limit} of {classes} classes: those with the most errors"
    index = np.full(classes, -1)
    index[keep] = np.arange(len(keep))
    m = np.zeros((len(keep), len(keep)), np.int64)
    inside_ = (index[t] >= 0) & (index[p] >= 0)
    np.add.at(m, (index[t[inside_]], index[p[inside_]]), c[inside_])
    return m, [class_names[i] for i in keep], note


def short_label(text: str, width: int = 24) -> str:
    """text in at most width characters: the middle elided (a class or file name's start and end tell it
    apart: "Great Spotted Wo…plumage) 3")."""
    if len(text) <= width:
        return text
    tail = (width - 1) // 2
    return text[:width - 1 - tail] + "\u2026" + text[len(text) - tail:]


def short_path(rel: str, width: int, parts: int = 2) -> str:
    """The last `parts` components of a relative path (class folder and file name: the same name in two
    classes is two photos) in at most width characters; the file name keeps most of the room."""
    comps = list(PurePosixPath(rel).parts[-parts:]) or [rel]
    dirs = comps[:-1]
    want = sum(min(len(c), 14) + 1 for c in dirs)  # each folder keeps up to 14 characters when names are long
    name = short_label(comps[-1], max(12, width - want))
    room = max(4, (width - len(name)) // max(1, len(dirs)) - 1)
    return "/".join([short_label(c, room) for c in dirs] + [name])


def relative_luminance(rgb) -> float:
    """WCAG 2 relative luminance of an sRGB colour (components in [0, 1])."""
    c = np.asarray(rgb[:3], dtype=np.float64)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    return float(lin @ np.array([0.2126, 0.7152, 0.0722]))


def contrast_ratio(a, b) -> float:
    la, lb = sorted((relative_luminance(a), relative_luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_color_on(rgb) -> str:
    """black or white, whichever contrasts more with the background colour rgb (at least 4.58:1 for any colour)."""
    return "black" if contrast_ratio(rgb, (0, 0, 0)) >= contrast_ratio(rgb, (1, 1, 1)) else "white"


def confusion_png(matrix, class_names: list[str], path: Path, title: str = "val") -> None:
    _save(confusion_figure(matrix, class_names, title), path)


def confusion_figure(matrix, class_names: list[str], title: str = "val"):
    """Counts of (true, predicted) cells, coloured from 0 to the largest cell; each count written in black or
    white by its contrast with its own cell's colour. Class names longer than 24 characters are elided in the
    middle, and the margins are sized from the longest shown name."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    m, names, note = matrix_view(matrix, class_names)
    names = [short_label(c) for c in names]
    n = len(names)
    font = 8 if n > 10 else 10
    label = 0.6 * font / 72 * max(len(c) for c in names) + 0.45  # inches: tick labels + axis label
    grid = min(max(0.55 * n, 3.0), 11.0)  # inches: 0.55 per class, at most 1100 px
    left, bottom, top, right = label, 0.72 * label + 0.2, 0.75, 0.25
    width, height = left + grid + right, bottom + grid + top
    fig = _figure(width, height)
    ax = fig.add_axes((left / width, bottom / height, grid / width, grid / height))
    cmap, norm = colormaps["Blues"], Normalize(0, max(int(m.max()), 1))
    ax.imshow(m, cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=font)
    ax.set_yticks(range(n), names, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({title})" + (f"\n{note}" if note else ""), fontsize=10)
    size = 10 if n <= 10 else 7
    cells = zip(*np.nonzero(m)) if n > 10 else np.ndindex(m.shape)  # many classes: zeros stay blank
    for i, j in cells:
        ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=size, color=text_color_on(cmap(norm(m[i, j]))))
    return fig


def _spread(indices: np.ndarray, k: int) -> list[int]:
    """k indices evenly spaced over the list (so every class of a sorted val set shows up)."""
    if k <= 0 or len(indices) == 0:
        return []
    pos = np.linspace(0, len(indices) - 1, num=min(k, len(indices))).round().astype(int)
    return [int(indices[p]) for p in pos]


def pick_examples(y_true, y_pred, n: int = 8) -> list[int]:
    """Up to n indices: wrong predictions (up to half) and correct ones, each spread over the set."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    wrong = _spread(np.flatnonzero(y_true != y_pred), n // 2)
    right = _spread(np.flatnonzero(y_true == y_pred), n - len(wrong))
    return sorted(wrong + right)


def _display_rgb(im):
    """8-bit RGB for display: transparency over white, 16-bit and float images scaled to their peak."""
    from PIL import Image

    if im.mode == "RGB":
        return im
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = np.clip(a * (255.0 / max(float(a.max(initial=0)), 1.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")


def thumbnail(path: str | os.PathLike, size: int = THUMB) -> np.ndarray | str:
    """A display thumbnail (H,W,3 uint8, longest side <= size), or why there is none.

    Cheap by design: JPEGs decode at a reduced DCT scale (draft) and other formats are reduced by an
    integer factor before resampling, so an 8-picture grid of camera photos costs tens of ms.
    """
    from PIL import Image, ImageOps

    register_heif()  # HEIC photos are drawn too
    try:
        with Image.open(path) as im:
            im.draft("RGB", (size, size))  # JPEG only: decode at 1/2..1/8 scale, still >= size
            im = ImageOps.exif_transpose(im)
            im.thumbnail((size, size), reducing_gap=2.0)
            return np.asarray(_display_rgb(im))
    except FileNotFoundError:
        return MISSING
    except Exception as e:  # damaged or replaced since extract: say so instead of "not found"
        return f"cannot read image ({type(e).__name__})"


def prediction_title(predicted: str, true: str, probability: float | None = None) -> str:
    """A predictions.png title: the predicted class (with its probability when known) and, when wrong, the
    true one; names elided to fit a 300 px tile."""
    shown = f"predicted: {short_label(predicted, 18)}" + ("" if probability is None else f" (p {probability:.2f})")
    return shown if predicted == true else f"{shown}\nWRONG (true: {short_label(true, 18)})"


def predictions_png(image_paths: list[Path | None], y_true, y_pred, class_names: list[str], path: Path,
                    cols: int = 4, confidence: list[float] | None = None) -> None:
    """The tutorial's visualize_model: val images titled with the prediction (and its probability, from
    confidence: one per image), wrong ones in red.

    One mosaic image and one text per title (not one axes per picture): axes, ticks and their layout
    were most of the cost of this picture."""
    idx = pick_examples(y_true, y_pred)
    rows = max(1, -(-len(idx) // cols))
    cell_w, cell_h, band = 300, 320, 56  # pixels: a 224 px thumbnail under a two-line title
    mosaic = np.full((rows * cell_h, cols * cell_w, 3), 255, np.uint8)
    fig = _figure(cols * cell_w / DPI, rows * cell_h / DPI)
    W, H = cols * cell_w, rows * cell_h
    for k, i in enumerate(idx):
        r, c = divmod(k, cols)
        x0, y0 = c * cell_w, r * cell_h
        img = thumbnail(image_paths[i]) if image_paths[i] else "image not shown (not in the data folder)"
        top = y0 + band
        if isinstance(img, str):
            fig.text((x0 + cell_w / 2) / W, 1 - (y0 + band + (cell_h - band) / 2) / H, img, ha="center", va="center")
        else:
            h, w = img.shape[:2]
            top, left = y0 + band + (cell_h - band - h) // 2, x0 + (cell_w - w) // 2
            mosaic[top:top + h, left:left + w] = img[..., :3]
        ok = y_true[i] == y_pred[i]
        title = prediction_title(class_names[y_pred[i]], class_names[y_true[i]],
                                 None if confidence is None else confidence[i])
        fig.text((x0 + cell_w / 2) / W, 1 - (top - 4) / H, title, ha="center", va="bottom",
                 color="black" if ok else "red", fontsize=10)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    ax.imshow(mosaic, interpolation="none", aspect="auto")  # one figure pixel per mosaic pixel
    ax.set_zorder(-1)
    _save(fig, path)


def images_grid_png(images: np.ndarray, titles: list[str], path: Path, cols: int = 4,
                    savefig: dict | None = None) -> None:
    """A grid of images (N,H,W,3 floats in [0,1]) with titles (the tutorial's imshow of a batch); savefig:
    more keywords for fig.savefig (metadata)."""
    rows = max(1, -(-len(images) // cols))
    fig = _figure(3 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.4 / (3.2 * rows), wspace=0.05, hspace=0.2)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, t in zip(axes.flat, images, titles):
        ax.imshow(img)
        ax.set_title(t, fontsize=10)
    _save(fig, path, **(savefig or {}))


# --------------------------------------------------------------------------- a run's pictures


@dataclass
class PictureJob:
    """Everything a run's pictures need, as plain data."""

    out: str
    history: list[dict]
    confusion_matrix: list | dict  # metrics.confusion_record: dense rows, or sparse entries for many classes
    class_names: list[str]
    split: str
    image_paths: list[str | None]  # absolute, one per row of the split; None: not to be read
    y_true: list[int]
    y_pred: list[int]
    kept_epoch: int | None = None  # marked in curves.png
    calibration: dict | None = None  # metrics.json's calibration record: reliability.png, coverage.png
    learning_curve: dict | None = None  # metrics.json's learning_curve record: learning_curve.png
    confidence: list[float] | None = None  # per row: the predicted class's probability (predictions.png)
    novelty: dict | None = None  # {"threshold": t, "scores": {split: per-photo novelty}} (novelty.png)


def draw_pictures(job: PictureJob) -> list[str]:
    """Draw curves.png, confusion.png, predictions.png into job.out; a note per picture that failed.
    The run's model and metrics are already saved: a picture must never fail a finished run."""
    out = Path(job.out)
    steps = {
        "curves.png": lambda p: curves_png(job.history, p, job.kept_epoch),
        "confusion.png": lambda p: confusion_png(job.confusion_matrix, job.class_names, p, job.split),
        "predictions.png": lambda p: predictions_png([f and Path(f) for f in job.image_paths], job.y_true,
                                                     job.y_pred, job.class_names, p, confidence=job.confidence),
    }
    if job.calibration:
        steps["reliability.png"] = lambda p: reliability_png(job.calibration, p)
        steps["coverage.png"] = lambda p: coverage_png(job.calibration, p)
    if job.learning_curve:
        steps["learning_curve.png"] = lambda p: learning_curve_png(job.learning_curve, p)
    if job.novelty and job.novelty["scores"]:
        steps["novelty.png"] = lambda p: novelty_png(job.novelty["scores"], job.novelty["threshold"], p)
    notes = []
    for name, draw in steps.items():
        try:
            draw(out / name)
        except Exception as e:  # MemoryError included: the picture is lost, the run is not
            notes.append(f"{name} not drawn: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    return notes


def resolve_data_dir(recorded: str, cache_path: str | os.PathLike, probe: str | None = None) -> Path:
    """The absolute data folder of a cache. New caches record it absolute; an older cache may hold it as
    typed (relative to wherever extract ran): then try the cache file's folder, then the current folder,
    and take the first where probe (a path of the cache, relative to the data folder) exists."""
    p = Path(recorded)
    if p.is_absolute():
        return p
    candidates = [(Path(cache_path).resolve().parent / p), (Path.cwd() / p)]
    for c in candidates:
        if probe is not None and (c / probe).exists():
            return c.resolve()
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    return candidates[-1].resolve()


def data_folder(cache, override: str | None = None) -> tuple[Path | None, str]:
    """The folder a cache's paths are relative to: override (--data-dir), else the cache's absolute data_root
    (only it: a folder of the same name under the cwd may hold other photos), else, for caches made before
    data_root was recorded, the data_dir its extract was given (resolved as resolve_data_dir does). Returns
    (folder, "") or (None, why). The one answer for train-head's pictures and audit."""
    if override:
        p = Path(override)
        return (p, "") if p.is_dir() else (None, f"--data-dir {override} is not a folder")
    if cache.meta.data_root:  # recorded by extract: the answer, or none (never a guess that may be another folder)
        p = Path(cache.meta.data_root)
        if not p.is_absolute():
            return None, f"the cache's data_root {cache.meta.data_root!r} is not an absolute path"
        return (p, "") if p.is_dir() else (None, f"data folder {p} not found (moved or deleted?)")
    recorded = cache.meta.config.get("data_dir")  # a cache made before data_root was recorded: as typed
    if not isinstance(recorded, str) or not recorded:
        return None, "the cache records no data folder"
    probe = next((sp.paths[0] for sp in cache.splits.values() if len(sp.paths)), None)
    p = resolve_data_dir(recorded, cache.path, probe)
    return (p, "") if p.is_dir() else (None, f"data folder not found (tried {p})")


def inside(data_dir: Path, rel: str) -> Path | None:
    """data_dir / rel when rel is a plain relative path (no '..', not absolute); None otherwise, so a
    crafted cache cannot make a picture read files outside its data folder."""
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or not rel:
        return None
    return data_dir / pure


def reliability_png(cal: dict, path: Path) -> None:
    _save(reliability_figure(cal), path)


def reliability_figure(cal: dict):
    """Per evaluated split: accuracy against mean confidence per bin, calibrated and before (only the head's
    own when no temperature was kept), the diagonal being perfect calibration; below, the photos per bin as
    bars with their counts (on the markers they hid the points and collided with the axis)."""
    splits = list(cal["reliability"]) or ["val"]
    fitted = cal.get("fitted", True)
    fig = _figure(5 * len(splits), 5.6)
    grid = fig.add_gridspec(2, len(splits), height_ratios=(3.2, 1), hspace=0.08)
    curves = ((("reliability_before", dict(color="tab:orange", alpha=0.7), "before"),
               ("reliability", dict(color="tab:blue"), f"calibrated (T {cal['temperature']:.2f})")) if fitted else
              (("reliability_before", dict(color="tab:orange"), "the head's own (no temperature kept)"),))
    for i, split in enumerate(splits):
        ax = fig.add_subplot(grid[0, i])
        bars = fig.add_subplot(grid[1, i], sharex=ax)
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, ls="--", label="perfect")
        for key, style, label in curves:
            rows = [r for r in cal[key].get(split, []) if r["n"]]
            ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o-", ms=4, label=label, **style)
        e = cal["ece"].get(split, {})
        ece = f"ECE {e.get('before', 0):.3f} -> {e.get('after', 0):.3f}" if fitted else \
            f"ECE {e.get('before', 0):.3f}, no temperature kept"
        ax.set_title(f"{split}: {ece}", fontsize=10)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.02, 1.05)
        ax.tick_params(labelbottom=False)
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        _bin_counts(bars, cal["reliability"].get(split, []))
    fig.subplots_adjust(left=0.12 / len(splits) ** 0.5, right=0.98, bottom=0.1, top=0.93, wspace=0.25)
    return fig


def _bin_counts(ax, rows: list[dict]) -> None:
    """Photos per confidence bin: a bar per bin, its count above it."""
    shown = [r for r in rows if r["n"]]
    peak = max([r["n"] for r in shown], default=1)
    ax.bar([(r["low"] + r["high"]) / 2 for r in rows], [r["n"] for r in rows],
           width=[0.9 * (r["high"] - r["low"]) for r in rows], color="0.6")
    for r in shown:
        ax.text((r["low"] + r["high"]) / 2, r["n"] + 0.04 * peak, str(r["n"]), ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.4 * peak)
    ax.set_xlim(0, 1.02)
    ax.set_yticks([])
    ax.set_ylabel("photos", fontsize=8)
    ax.set_xlabel("confidence (mean per bin)")


def coverage_png(cal: dict, path: Path) -> None:
    _save(coverage_figure(cal), path)


def coverage_figure(cal: dict):
    """Accuracy on the photos kept against the share kept, one point per --min-confidence P (labelled on
    the side of the point that faces the plot's inside, so no label leaves the axes)."""
    fig = _figure(6.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for split, rows in cal["coverage"].items():
        rows = [r for r in rows if r["accuracy"] is not None]
        line = ax.plot([r["kept"] for r in rows], [r["accuracy"] for r in rows], "o-", ms=4, label=split)[0]
        if split == next(iter(cal["coverage"])):
            low = min((r["accuracy"] for r in rows), default=0.0)
            for r in rows:
                if r["min_confidence"] in (0.5, 0.8, 0.9, 0.95, 0.99):
                    left = r["kept"] > 0.5  # label towards the middle
                    up = r["accuracy"] - low < 0.1 * max(1.0 - low, 1e-9)  # near the bottom: above the point
                    ax.annotate(f"P {r['min_confidence']:g}", (r["kept"], r["accuracy"]), textcoords="offset points",
                                xytext=(-6 if left else 6, 5 if up else -11), ha="right" if left else "left",
                                fontsize=7, color=line.get_color())
    ax.set_xlabel("share of photos kept (probability >= P); the rest are 'unsure'")
    ax.set_ylabel("accuracy on the photos kept")
    ax.set_xlim(-0.02, 1.02)
    ax.margins(y=0.08)
    which = " (calibrated)" if cal.get("fitted", True) else "\n(the head's own probabilities: no temperature kept)"
    ax.set_title(f"--min-confidence P: accuracy vs coverage{which}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def novelty_png(scores: dict, threshold: float, path: Path) -> None:
    _save(novelty_figure(scores, threshold), path)


def novelty_figure(scores: dict, threshold: float):
    """How unlike the training photos each val (and test) photo is, against the threshold above which
    predict calls a photo unknown. Every photo here is of a known class: the share right of the line is
    what the threshold costs. Bins in equal steps up to 3 x the threshold; stranger photos in the last."""
    fig = _figure(6.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    top = 3.0 * max(threshold, 1e-9)
    low = min(min((float(np.min(v)) for v in scores.values() if len(v)), default=0.0), 0.0)
    bins = np.linspace(low, top, 41)
    for split, v in scores.items():
        v = np.clip(np.asarray(v, dtype=float), low, top)
        above = int((np.asarray(scores[split]) > threshold).sum())
        ax.hist(v, bins=bins, histtype="step", lw=1.5,
                label=f"{split}: {above} of {len(v)} above ({above / max(len(v), 1):.1%})")
    ax.axvline(threshold, color="0.2", ls="--", lw=1)
    ax.annotate(f"threshold {threshold:.2f}: above it, 'unknown'", (threshold, 1), xycoords=("data", "axes fraction"),
                xytext=(4, -12), textcoords="offset points", fontsize=8, color="0.2")
    ax.set_xlabel(f"novelty (0 = a typical training photo; photos beyond {top:.1f} are counted in the last bin)")
    ax.set_ylabel("photos of known classes")
    ax.set_title("novelty of known-class photos (higher = less like the training photos)", fontsize=10)
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def learning_curve_png(record: dict, path: Path) -> None:
    _save(learning_curve_figure(record), path)


def learning_curve_figure(record: dict):
    """Val score against labelled photos per class: the mean of each share's draws with its 95% interval
    (shaded), each draw a dot; the last doubling's gain and its paired noise as the title."""
    pts = record["points"]
    fig = _figure(6.5, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    x = [p["per_class"] for p in pts]
    ax.fill_between(x, [p["low"] for p in pts], [p["high"] for p in pts], color="tab:blue", alpha=0.15,
                    label="95% interval (val)")
    ax.plot(x, [p["mean"] for p in pts], "o-", color="tab:blue", ms=4, label="mean of draws")
    for p in pts:
        ax.plot([p["per_class"]] * len(p["values"]), p["values"], ".", color="0.3", ms=4)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_plain_ticks())
    ax.xaxis.set_minor_formatter(_plain_ticks(minor=True))
    ax.set_xlabel("labelled photos per class (train, log scale)")
    ax.set_ylabel(f"val {record['metric'].replace('_', ' ')}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(learning_curve_title(record), fontsize=10)
    fig.tight_layout()
    return fig


def signed(value: float, digits: int = 1) -> str:
    """value with its sign to `digits` decimals, never "-0.0" (a loss that rounds to nothing is no loss)."""
    v = round(float(value), digits)
    return f"{(v if v != 0 else 0.0):+.{digits}f}"


def learning_curve_title(record: dict) -> str:
    """What learning_curve.png says on top: the report's reading of the last doubling, in a title's words."""
    pts, d = record["points"], record.get("doubling")
    if not d:
        return f"val {record['metric'].replace('_', ' ')} with all of train (one share only)"
    half = next((p for p in pts if p["share"] == d["from_share"]), pts[0])
    if half["rows"] == pts[-1]["rows"]:
        return f"train is too small for a curve: every share holds the same {pts[-1]['rows']} rows"
    return (f"last doubling of labelled photos: {signed(100 * d['gain'])} points "
            f"(paired noise \u00b1{200 * d['se']:.1f})")


def _plain_ticks(minor: bool = False):
    """Log-axis tick labels as plain numbers (12, 25, 50, 100), not powers of ten; minor ticks at 2 and 5."""
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _):
        lead = round(v / 10 ** np.floor(np.log10(v))) if v > 0 else 0
        return f"{v:g}" if not minor or lead in (2, 5) else ""

    return FuncFormatter(fmt)
