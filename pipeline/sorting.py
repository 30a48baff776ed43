"""predict --sort-into: photos placed into OUT/<class>/, OUT/unsure/ and OUT/unknown/ by a run's predictions.

What a sort promises:
- a source photo is only read: never moved, renamed, changed or deleted. OUT gets symbolic links to the
  photos' real paths (they work across drives and show where each photo lives; moving the photos breaks
  them) or, with copy, copies (a folder that stands alone). Each input is resolved once (links and `..`
  as the OS follows them): the file read is the file placed;
- nothing in OUT is ever overwritten: OUT must be new or empty, every file is created exclusively, and an
  OUT that holds a finished sort (the hidden marker below) or anything else is refused before any work;
  OUT must be writable (and take symbolic links, without copy), checked before any photo is predicted;
- a photo appears whole or not at all: a copy is written to a hidden temp name, fsynced and linked to its
  name; a copy that fails (a full disk, a file size limit, Ctrl-C) leaves nothing behind;
- an interrupted or failed sort is finished by the same command: the marker stays unfinished and a journal
  names each photo placed, so a rerun places only the rest (a rerun with another run or other options is
  refused, saying so); every photo not placed is reported and makes the command fail;
- every readable photo is placed exactly once; two photos of one name (a/x.jpg, b/x.jpg) in one class
  get x.jpg and x-2.jpg; predictions.csv has a row for every input, saying where its photo went, and
  lists unreadable files and why;
- class names that are unsafe as folder names (a/b, .., control characters) get a safe folder name;
- photos inside an earlier sort's OUT (a sort made inside a source folder) are not sorted again.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from . import PipelineError
from .fsio import LockBusy, ProcessLock, atomic_output, fsync_dir, temp_name
from .predict import UNKNOWN, UNSURE, Prediction
from .text import printable

MARKER = ".tlearn-sort.json"  # at OUT's root: written first, so a re-run (finished or not) is recognised
JOURNAL = ".tlearn-sort.log"  # one JSON line [source, "folder/name"] per photo, written before it is placed
LOCK = ".tlearn-sort.lock"  # held while a sort writes into OUT
SORT_FORMAT = "tlearn-sort/2"  # /1 (no journal) cannot be resumed
CSV = "predictions.csv"
# novelty: "" without a novelty model; flag: "unknown" / "unsure" when class is that label, not a class of that name
CSV_COLUMNS = ("path", "class", "probability", "best_class", "file", "error", "novelty", "flag")
MAX_FOLDER_CHARS = 100
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
_TEMP = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")  # fsio.temp_name's names: a copy cut short
_FULL = (errno.ENOSPC, errno.EDQUOT)  # the destination is full: no later photo can be placed either
_PROBE = ".tlearn-probe-"  # the writability check's folder


class SortIntoError(PipelineError):
    """An output folder that a sort may not write into."""


@dataclass(frozen=True)
class SortSettings:
    """What a sort was asked for: an unfinished sort is finished only by a rerun asking the same."""

    run: str  # the run folder (absolute)
    copy: bool = False
    min_confidence: float = 0.0
    max_novelty: float | None = None  # None: the run's own threshold

    def record(self) -> dict:
        return {"run": os.path.abspath(self.run), "copy": self.copy, "min_confidence": self.min_confidence,
                "max_novelty": self.max_novelty}

    def describe(self) -> str:
        nov = f", --max-novelty {'of the run' if self.max_novelty is None else f'{self.max_novelty:g}'}"
        return (f"run {printable(self.record()['run'])}, {'--copy' if self.copy else 'links'}, "
                f"--min-confidence {self.min_confidence:g}{nov}")


def check_sort_output(out: str | os.PathLike, settings: SortSettings) -> bool:
    """Refuse, before any work, an OUT that is not a new or empty folder (or an unfinished sort asked again
    with the same settings), lies inside a run folder, or cannot be written. Returns True to resume."""
    from .runfolder import check_output_path

    check_output_path(out, flag="--sort-into")
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise SortIntoError(f"--sort-into {out} is a file; name a new folder")
    resume = p.is_dir() and _earlier_sort(p, out, settings)
    if p.is_dir() and not resume:
        try:  # another sort's writability probe (a hidden folder of a moment) is not the user's file
            first = next((e for e in os.scandir(p) if not e.name.startswith(_PROBE)), None)
        except OSError as e:
            raise SortIntoError(f"--sort-into {out} cannot be listed ({e.strerror or e})") from None
        if first is not None:
            raise SortIntoError(f"--sort-into {out} is not empty (it holds {printable(first.name)}); a sort never "
                                "writes among other files: name a new or empty folder")
    _check_writable(p, out, settings.copy)
    return resume


def _earlier_sort(p: Path, out, settings: SortSettings) -> bool:
    """True when p holds an unfinished sort asked for with these settings (to be finished); False when it
    holds no sort; refused when it holds a finished sort, an older one or one asked for otherwise."""
    if not (p / MARKER).is_file():
        if (p / CSV).is_file():
            raise SortIntoError(f"--sort-into {out} holds an earlier sort; nothing in it is changed: sort into a "
                                "new folder")
        return False
    try:
        rec = json.loads((p / MARKER).read_text())
        mine = {k: rec[k] for k in ("run", "copy", "min_confidence")}
        mine["max_novelty"] = rec.get("max_novelty")
        finished, fmt = rec["finished"], rec["format"]
    except (OSError, ValueError, KeyError, TypeError):
        raise SortIntoError(f"--sort-into {out} holds an earlier sort whose record {MARKER} cannot be read; "
                            "nothing in it is changed: sort into a new folder") from None
    if finished:
        raise SortIntoError(f"--sort-into {out} holds an earlier sort; nothing in it is changed: sort into a new "
                            "folder (photos added since are sorted with the rest)")
    if fmt != SORT_FORMAT:
        raise SortIntoError(f"--sort-into {out} holds an unfinished sort of an earlier tlearn, which cannot be "
                            "finished: sort into a new folder")
    if mine != settings.record():
        asked = SortSettings(str(mine["run"]), bool(mine["copy"]), float(mine["min_confidence"]),
                             None if mine["max_novelty"] is None else float(mine["max_novelty"]))
        raise SortIntoError(f"--sort-into {out} holds an unfinished sort of {asked.describe()}; finish it with "
                            "that run and those options, or sort into a new folder")
    _not_busy(p, out).release()  # checked now, before any photo is predicted; taken again to write
    return True


def _not_busy(p: Path, out) -> ProcessLock:
    """OUT's lock, taken (to be held while this sort writes); refused while another sort holds it."""
    try:
        return ProcessLock(p / LOCK).acquire()
    except LockBusy as e:
        raise SortIntoError(f"another sort ({e.holder}) is writing into {out} now; wait for it to end") from None


def _check_writable(p: Path, out, copy: bool) -> None:
    """A folder (and, for links, a symbolic link) made and removed where OUT is or will be made: a
    read-only place is refused before any photo is predicted, not after."""
    d = p
    while not d.is_dir() and d != d.parent:
        d = d.parent
    try:
        probe = tempfile.mkdtemp(prefix=_PROBE, dir=d)
    except OSError as e:
        raise SortIntoError(f"--sort-into {out} cannot be written ({e.strerror or e} in {printable(str(d))}); "
                            "name a folder you can write to") from None
    try:
        if not copy:
            os.symlink(probe, os.path.join(probe, "link"))
    except OSError as e:
        raise SortIntoError(f"cannot create symbolic links in {out} ({e.strerror or e}); this file system may "
                            "not allow them: add --copy") from None
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def drop_sort_outputs(entries: list[tuple[Path | str, str]], out: str | os.PathLike) -> tuple[list, list[str]]:
    """The entries without files that lie in OUT or in an earlier sort's OUT (a folder holding the marker):
    a sort made inside a source folder is not sorted again. Returns (kept entries, the sort folders left
    out, each once: the outermost folder holding the marker, not its class folders)."""
    out_real = os.path.realpath(out)
    root_of: dict[str, str | None] = {}  # folder -> the outermost sort folder holding it, or None

    def sort_root(d: str) -> str | None:
        if d not in root_of:
            parent = os.path.dirname(d)
            above = sort_root(parent) if parent != d else None
            here = d == out_real or os.path.isfile(os.path.join(d, MARKER))
            root_of[d] = above or (d if here else None)
        return root_of[d]

    kept, left_out = [], {}
    for path, reason in entries:
        root = sort_root(os.path.realpath(os.path.dirname(str(path)) or "."))  # links and .. as the OS
        if root is None:
            kept.append((path, reason))
        else:
            left_out[root] = None
    return kept, list(left_out)


def unique_entries(entries: list[tuple[Path | str, str]]) -> tuple[list[tuple[str, str, str]], list[tuple[str, int]]]:
    """Each input resolved once: (path as given, reason, the real path to read and to place), each file
    once (a folder and a file in it, or a link and its target, list one photo twice); returns (kept,
    repeats), a repeat being (path as given, index in kept of the entry naming the same file)."""
    first: dict[str, int] = {}
    kept, repeats = [], []
    for path, reason in entries:
        real = os.path.realpath(path)
        if real in first:
            repeats.append((str(path), first[real]))
            continue
        first[real] = len(kept)
        kept.append((str(path), reason, real))
    return kept, repeats


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
    nor `unknown` (their folders) nor predictions.csv; a clash gets -2, -3, ..."""
    taken = {UNSURE, UNKNOWN, CSV.lower()}
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
    failed: list[tuple[str, str]] = field(default_factory=list)  # readable photos not placed, and why
    renamed: int = 0  # photos placed under another name (a name taken in their folder)
    folders: dict[str, str] = field(default_factory=dict)  # class -> folder, where they differ
    left_out: list[str] = field(default_factory=list)  # earlier sorts inside the sources, not sorted again
    repeats: int = 0  # inputs naming a photo already listed (placed once)
    copied: bool = False
    resumed: int = 0  # photos an earlier, unfinished run of this sort had placed already


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
    """Create dest (never replacing anything) as a link to src or a copy of it. A copy is written to a
    temp name beside dest, fsynced and then given its name, so dest is whole or absent; the temp file is
    removed whatever happens (a full disk, a file size limit, Ctrl-C)."""
    if not copy:
        os.symlink(src, dest)
        return
    tmp = temp_name(dest)
    try:
        with open(src, "rb") as fin, open(tmp, "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copystat(src, tmp)
        _name_exclusively(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _name_exclusively(tmp: Path, dest: Path) -> None:
    """tmp's file under the name dest, never replacing a file there: a hard link (refused when dest
    exists); where a file system has none, a rename after checking dest is free."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, "File exists", str(dest)) from None
        os.rename(tmp, dest)


class _Journal:
    """OUT's record of the photos this sort placed: a line is written (and handed to the OS) before its
    photo is placed, so after a kill the journal names every photo that may be in OUT; a line whose file
    exists is a photo placed."""

    def __init__(self, out: Path):
        self.out, self.path = out, out / JOURNAL
        self.fh = None

    def placed(self) -> dict[str, str]:
        """{source real path: 'folder/name'} of the photos an earlier run of this sort placed. A name whose
        photo failed is given to the next photo: the last line naming a file is the one that made it."""
        made = {}  # folder/name -> source
        with contextlib.suppress(FileNotFoundError), open(self.path, encoding="utf-8") as fh:
            for line in fh:
                with contextlib.suppress(ValueError, TypeError):
                    src, rel = json.loads(line)
                    if isinstance(src, str) and isinstance(rel, str):
                        made[rel] = src
        return {src: rel for rel, src in made.items() if os.path.lexists(self.out / rel)}

    def add(self, src: str, rel: str) -> None:
        if self.fh is None:
            self.fh = open(self.path, "a", encoding="utf-8")
        self.fh.write(json.dumps([src, rel]) + "\n")
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            with contextlib.suppress(OSError):  # a full disk: the lines that reached the OS are what counts
                os.fsync(self.fh.fileno())
            with contextlib.suppress(OSError):
                self.fh.close()
            self.fh = None


def _claim(out_p: Path, out, settings: SortSettings, resume: bool) -> ProcessLock:
    """OUT claimed (a new sort's marker created exclusively) and its lock held while this sort writes."""
    if not resume:
        out_p.mkdir(parents=True, exist_ok=True)
        try:  # exclusive, so two sorts into one new folder cannot both go on
            fd = os.open(out_p / MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise SortIntoError(f"--sort-into {out} was claimed by another sort meanwhile; name a new folder") from None
        with os.fdopen(fd, "w") as fh:
            json.dump({"format": SORT_FORMAT, **settings.record(), "finished": False}, fh)
    lock = _not_busy(out_p, out)
    if resume and json.loads((out_p / MARKER).read_text()).get("finished"):  # finished while we waited
        lock.release()
        raise SortIntoError(f"--sort-into {out} holds an earlier sort, finished meanwhile; nothing in it is changed")
    return lock


def _existing_names(folder: Path, resume: bool) -> set[str]:
    """The names in a class folder (an unfinished sort's): never reused. Temp files of copies cut short
    (this sort's own, by their names) are removed."""
    names = set()
    with contextlib.suppress(FileNotFoundError):
        for e in os.scandir(folder):
            if resume and _TEMP.match(e.name) and e.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
                continue
            names.add(e.name.casefold())
    return names


def sort_into(preds: list[Prediction], class_names: list[str], out: str | os.PathLike, settings: SortSettings,
              repeats: list[tuple[str, int]] = ()) -> SortResult:
    """Place every classified photo into OUT/<class folder>/ (or OUT/unsure/, OUT/unknown/) and write OUT/predictions.csv.

    Args:
        preds: one per file, in order; each photo is read from (and placed as) its `source` when set.
        class_names: the run's classes (every one gets a folder name, used or not).
        out: the folder; check_sort_output(out, settings) must have passed (it is checked again here).
        settings: the run and options; an unfinished sort of the same settings in OUT is finished.
        repeats: (input path, index in preds) of inputs naming a photo listed before: a row each.
    A photo that cannot be placed is listed in result.failed (the marker then stays unfinished)."""
    resume = check_sort_output(out, settings)
    out_p = Path(out)
    lock = _claim(out_p, out, settings, resume)
    try:
        result, rows = _place_all(preds, class_names, out_p, settings, resume)
        for path, i in repeats:
            rows[i].append((path, *rows[i][0][1:]))
        result.repeats = len(repeats)
        _finish(out_p, out, settings, result, [r for group in rows for r in group])
    finally:
        lock.release()
    return result


class _Placer:
    """Places photos into OUT's class folders under free names, journalled; after a full disk it places
    nothing more (each later photo is reported as not placed, with why)."""

    def __init__(self, out_p: Path, copy: bool, resume: bool):
        self.out_p, self.copy, self.resume = out_p, copy, resume
        self.journal = _Journal(out_p)
        self.taken: dict[str, set[str]] = {}  # folder -> names in it (casefolded)
        self.full: str | None = None  # the full disk's words, once met

    def place(self, src: str, name: str, folder: str) -> tuple[str, str]:
        """(folder/name placed, '') or ('', why not)."""
        if self.full:
            return "", f"not placed: the sort stopped at a full disk ({self.full})"
        placed = None
        try:
            if folder not in self.taken:
                (self.out_p / folder).mkdir(exist_ok=True)
                self.taken[folder] = _existing_names(self.out_p / folder, self.resume)
            placed = _place_name(name, self.taken[folder])
            self.journal.add(src, f"{folder}/{placed}")
            _place(src, self.out_p / folder / placed, self.copy)
        except OSError as e:
            if placed is not None:
                self.taken[folder].discard(placed.casefold())
            if e.errno in _FULL:
                self.full = e.strerror or str(e)
            return "", f"not placed: {e.strerror or e}"
        return f"{folder}/{placed}", ""


def _place_all(preds, class_names, out_p: Path, settings: SortSettings, resume: bool):
    """(result, rows: a list of CSV rows per prediction) with every photo placed that could be."""
    folders = class_folders(class_names)
    result = SortResult(str(out_p), folders={c: f for c, f in folders.items() if c != f}, copied=settings.copy)
    placer = _Placer(out_p, settings.copy, resume)
    done = placer.journal.placed() if resume else {}
    rows = []
    try:
        for p in preds:
            if p.error:
                result.unreadable.append((p.path, p.error))
                rows.append([(p.path, "", "", "", "", p.error, "", "")])
                continue
            src, name = p.source or os.path.realpath(p.path), os.path.basename(p.path)
            rel, why = done.get(src), ""
            if rel is not None:
                result.resumed += 1
            else:
                rel, why = placer.place(src, name, p.shown_class if (p.unknown or p.unsure) else folders[p.label])
                result.renamed += bool(rel) and os.path.basename(rel) != name
            if why:
                result.failed.append((p.path, why))
                rows.append([(p.path, "", "", "", "", why, "", "")])
                continue
            where = rel.split("/", 1)[0]
            result.placed[where] = result.placed.get(where, 0) + 1
            flag = "unknown" if p.unknown else "unsure" if p.unsure else ""
            rows.append([(p.path, p.shown_class, f"{p.probability:.6f}", p.label, rel, "",
                          "" if p.novelty is None else f"{p.novelty:.4f}", flag)])
    finally:
        placer.journal.close()
    return result, rows


def _finish(out_p: Path, out, settings: SortSettings, result: SortResult, rows: list[tuple]) -> None:
    """predictions.csv, then the marker: finished only when every readable photo was placed (else a rerun
    of the same command places the rest)."""
    finished = not result.failed
    try:
        _write_csv(out_p / CSV, rows)
        for folder in result.placed:
            fsync_dir(out_p / folder)
        with atomic_output(out_p / MARKER) as tmp, open(tmp, "w") as fh:
            json.dump({"format": SORT_FORMAT, **settings.record(), "finished": finished, "placed": result.placed,
                       "unreadable": len(result.unreadable), "not_placed": len(result.failed)}, fh)
    except OSError as e:
        raise SortIntoError(f"cannot write {CSV} in {out} ({e.strerror or e}); the {sum(result.placed.values())} "
                            "photos placed are kept: make room and rerun the same command to finish") from None
    if finished:
        with contextlib.suppress(OSError):
            os.unlink(out_p / JOURNAL)
    fsync_dir(out_p)


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
    if r.resumed:
        lines.append(f"resumed an unfinished sort: {r.resumed} of these photos were placed by its earlier run")
    if r.renamed:
        lines.append(f"{r.renamed} photos were placed under a new name (a photo of that name was in the folder "
                     "already); predictions.csv says where each went")
    for c, f in r.folders.items():
        lines.append(f"class {printable(c)!s} -> folder {printable(f)}")
    if r.repeats:
        lines.append(f"{r.repeats} inputs named a photo already listed (a link and its target, or a file inside a "
                     "folder also given): each photo is placed once, under the name it was first listed by; "
                     "predictions.csv has a row for every input")
    if r.left_out:
        lines.append(f"left out {len(r.left_out)} earlier sort{'s' if len(r.left_out) > 1 else ''} inside the "
                     f"inputs, not sorted again: {', '.join(printable(d) for d in r.left_out)}")
    lines.append(f"table: {printable(str(Path(r.out) / CSV))}")
    return lines
