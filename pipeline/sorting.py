"""predict --sort-into: photos placed into OUT/<class>/ and OUT/unsure/ by a run's predictions.

What a sort promises:
- a source photo is only read: never moved, renamed, changed or deleted. OUT gets symbolic links to the
  photos' absolute paths (they work across drives and show where each photo lives; moving the photos breaks
  them) or, with copy, copies (a folder that stands alone);
- nothing in OUT is ever overwritten: OUT must be new or empty, every file is created exclusively, and an
  OUT that holds an earlier sort (the hidden marker below) or anything else is refused before any work;
- every readable photo is placed exactly once; two photos of one name (a/x.jpg, b/x.jpg) in one class
  get x.jpg and x-2.jpg; predictions.csv says where each photo went and lists unreadable files and why;
- class names that are unsafe as folder names (a/b, .., control characters) get a safe folder name;
- photos inside an earlier sort's OUT (a sort made inside a source folder) are not sorted again.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from . import PipelineError
from .fsio import atomic_output, fsync_dir
from .predict import UNSURE, Prediction
from .text import printable

MARKER = ".tlearn-sort.json"  # at OUT's root: written first, so a re-run (finished or not) is recognised
SORT_FORMAT = "tlearn-sort/1"
CSV = "predictions.csv"
CSV_COLUMNS = ("path", "class", "probability", "best_class", "file", "error")
MAX_FOLDER_CHARS = 100
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


class SortIntoError(PipelineError):
    """An output folder that a sort may not write into."""


def check_sort_output(out: str | os.PathLike) -> None:
    """Refuse, before any work, an OUT that is not a new or empty folder, or lies inside a run folder."""
    from .runfolder import check_output_path

    check_output_path(out, flag="--sort-into")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise SortIntoError(f"--sort-into {out} is a file; name a new folder")
    if not p.is_dir():
        return
    if (p / MARKER).is_file() or (p / CSV).is_file():
        raise SortIntoError(f"--sort-into {out} holds an earlier sort; nothing in it is changed: sort into a new "
                            "folder (photos added since are sorted with the rest)")
    try:
        first = next(os.scandir(p), None)
    except OSError as e:
        raise SortIntoError(f"--sort-into {out} cannot be listed ({e.strerror or e})") from None
    if first is not None:
        raise SortIntoError(f"--sort-into {out} is not empty (it holds {printable(first.name)}); a sort never "
                            "writes among other files: name a new or empty folder")


def drop_sort_outputs(entries: list[tuple[Path | str, str]], out: str | os.PathLike) -> tuple[list, list[str]]:
    """The entries without files that lie in OUT or in an earlier sort's OUT (a folder holding the marker):
    a sort made inside a source folder is not sorted again. Returns (kept entries, folders left out)."""
    out_real = os.path.realpath(out)
    is_sort: dict[str, bool] = {}
    left_out: dict[str, None] = {}

    def sort_root(d: str) -> str | None:
        chain = []
        while True:
            if d in is_sort:
                hit = is_sort[d]
                break
            if d == out_real or os.path.isfile(os.path.join(d, MARKER)):
                hit = True
                break
            chain.append(d)
            parent = os.path.dirname(d)
            if parent == d:
                hit = False
                break
            d = parent
        for c in chain:
            is_sort[c] = hit
        if not hit:
            return None
        while os.path.dirname(d) != d and is_sort.get(os.path.dirname(d)):
            d = os.path.dirname(d)
        return d

    kept = []
    for path, reason in entries:
        root = sort_root(os.path.dirname(os.path.abspath(path)))
        if root is None:
            kept.append((path, reason))
        else:
            left_out[root] = None
    return kept, list(left_out)


def unique_entries(entries: list[tuple[Path | str, str]]) -> tuple[list, int]:
    """The entries with each file once (by real path: a folder and a file in it, or a link to a file also
    named, list one photo twice); returns (kept, how many repeats were dropped)."""
    seen: set[str] = set()
    kept = []
    for path, reason in entries:
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        kept.append((path, reason))
    return kept, len(entries) - len(kept)


def safe_folder_name(name: str) -> str:
    """A class name as one folder name on any common file system: separators, NUL and control characters
    become _, leading dots (hidden) and trailing dots or spaces (dropped by Windows) are replaced or cut,
    reserved device names get a trailing _, at most 100 characters; an empty result is 'class'."""
    chars = []
    for ch in name:
        bad = ch in '/\\:*?"<>|\0' or unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp")
        chars.append("_" if bad else ch)
    s = "".join(chars).strip().rstrip(". ")
    s = "_" + s[1:] if s.startswith(".") else s
    s = s[:MAX_FOLDER_CHARS].rstrip(". ")
    if not s:
        s = "class"
    if s.split(".")[0].lower() in _WINDOWS_RESERVED:
        s += "_"
    return s


def class_folders(class_names: list[str]) -> dict[str, str]:
    """{class name: folder name}: safe, distinct even on case-insensitive file systems, never `unsure`
    (the unsure folder) nor predictions.csv; a clash gets -2, -3, ..."""
    taken = {UNSURE, CSV.lower()}
    out = {}
    for c in class_names:
        base = safe_folder_name(c)
        name, k = base, 2
        while name.casefold() in taken:
            name, k = f"{base}-{k}", k + 1
        taken.add(name.casefold())
        out[c] = name
    return out


@dataclass
class SortResult:
    out: str
    placed: dict[str, int] = field(default_factory=dict)  # folder -> photos
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    renamed: int = 0  # photos placed under another name (a name taken in their folder)
    folders: dict[str, str] = field(default_factory=dict)  # class -> folder, where they differ
    left_out: list[str] = field(default_factory=list)  # earlier sorts inside the sources, not sorted again
    repeats: int = 0  # inputs naming a photo already listed (placed once)
    copied: bool = False


def _place_name(name: str, taken: set[str]) -> str:
    """name, or stem-2.ext, stem-3.ext ... when taken (case-insensitively); kept within 255 bytes."""
    stem, ext = os.path.splitext(name)
    candidate, k = name, 2
    while candidate.casefold() in taken or len(os.fsencode(candidate)) > 255:
        tail = f"-{k}{ext}"
        cut = stem
        while len(os.fsencode(cut + tail)) > 255:
            cut = cut[:-1]
        candidate, k = cut + tail, k + 1
    taken.add(candidate.casefold())
    return candidate


def _place(src: str, dest: Path, copy: bool) -> None:
    """Create dest (never replacing anything) as a link to src or a copy of it."""
    if not copy:
        os.symlink(src, dest)
        return
    with open(src, "rb") as fin, open(dest, "xb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    shutil.copystat(src, dest)


def sort_into(preds: list[Prediction], class_names: list[str], out: str | os.PathLike, run_dir: str,
              copy: bool = False, min_confidence: float = 0.0) -> SortResult:
    """Place every classified photo into OUT/<class folder>/ (or OUT/unsure/) and write OUT/predictions.csv.
    check_sort_output(out) must have passed; it is checked again here, as OUT is claimed."""
    check_sort_output(out)
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    try:  # the claim: exclusive, so two sorts into one new folder cannot both go on
        fd = os.open(out_p / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise SortIntoError(f"--sort-into {out} was claimed by another sort meanwhile; name a new folder") from None
    with os.fdopen(fd, "w") as fh:
        json.dump({"format": SORT_FORMAT, "run": os.path.abspath(run_dir), "copy": copy,
                   "min_confidence": min_confidence, "finished": False}, fh)
    folders = class_folders(class_names)
    result = SortResult(str(out), folders={c: f for c, f in folders.items() if c != f}, copied=copy)
    taken: dict[str, set[str]] = {}
    rows = []
    for p in preds:
        if p.error:
            result.unreadable.append((p.path, p.error))
            rows.append((p.path, "", "", "", "", p.error))
            continue
        folder = UNSURE if p.unsure else folders[p.label]
        if folder not in taken:
            (out_p / folder).mkdir(exist_ok=True)
            taken[folder] = set()
        name = os.path.basename(p.path)
        placed = _place_name(name, taken[folder])
        result.renamed += placed != name
        try:
            _place(os.path.abspath(p.path), out_p / folder / placed, copy)
        except OSError as e:
            if not copy and not result.placed:
                raise SortIntoError(f"cannot create links in {out} ({e.strerror or e}); this file system may not "
                                    "allow symbolic links: add --copy") from None
            result.unreadable.append((p.path, f"not placed: {e.strerror or e}"))
            rows.append((p.path, "", "", "", "", f"not placed: {e.strerror or e}"))
            continue
        result.placed[folder] = result.placed.get(folder, 0) + 1
        rows.append((p.path, p.shown_class, f"{p.probability:.6f}", p.label, f"{folder}/{placed}", ""))
    _write_csv(out_p / CSV, rows)
    with atomic_output(out_p / MARKER) as tmp, open(tmp, "w") as fh:
        json.dump({"format": SORT_FORMAT, "run": os.path.abspath(run_dir), "copy": copy,
                   "min_confidence": min_confidence, "finished": True, "placed": result.placed,
                   "unreadable": len(result.unreadable)}, fh)
    fsync_dir(out_p)
    return result


def _write_csv(path: Path, rows: list[tuple]) -> None:
    """Paths as the OS gives them (bytes that are not UTF-8 kept as they are, so each path names its file)."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        w.writerows(rows)


def summary_lines(r: SortResult) -> list[str]:
    total = sum(r.placed.values())
    how = "copies" if r.copied else "links"
    lines = [f"sorted {total} photos into {printable(r.out)} ({how}): "
             + ", ".join(f"{printable(f)} {n}" for f, n in sorted(r.placed.items()))]
    if r.renamed:
        lines.append(f"{r.renamed} photos were placed under a new name (a photo of that name was in the folder "
                     "already); predictions.csv says where each went")
    for c, f in r.folders.items():
        lines.append(f"class {printable(c)!s} -> folder {printable(f)}")
    if r.repeats:
        lines.append(f"{r.repeats} inputs named a photo already listed; each photo is placed once")
    for d in r.left_out:
        lines.append(f"left out {printable(d)}: an earlier sort's folder, not sorted again")
    lines.append(f"table: {printable(str(Path(r.out) / CSV))}")
    return lines
