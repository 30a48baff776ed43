"""What existing caches are still good for: the extract's decision about the file at its cache path
(build, done, or update), and, for an update, which rows of the plan some cache of the same settings
already holds.

A row's features depend only on the photo's bytes and the settings (the fingerprint); its label, path
and split are the view the folder gives now. So an update matches rows by content (the sha256 every
cache records per file): a file moved to another class folder, renamed, put in another split, or the
same photo in another cache (--reuse) keeps its features; only content no cache knows is decoded. A
file is hashed only when its path, size and mtime do not match what a cache of the same folder
recorded, so a rerun over unchanged files is a stat pass.

`decide` reads the caches; `settings_decision` and `compare_files` decide from what was read (but for
the content hashes they are handed, asked only for files whose stat matches no record)."""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.fsio import sha256_file
from pipeline.splits import SplitSpec

from .attrs import CacheAttrs
from .errors import CacheError, CacheMismatch, CacheMissing
from .plan import ExtractionPlan
from .store import FeatureCache, read_attrs, read_cache


class Decision(enum.Enum):
    """What to do about the file at the cache path."""

    BUILD = "build"  # no usable cache (or --force): extract every row
    DONE = "done"  # complete for these settings, these unchanged files and this split
    UPDATE = "update"  # same settings; the folder changed: reuse every row whose content a cache knows


@dataclass(frozen=True)
class OldFile:
    """A file an older cache of the same settings holds, as it was when extracted."""

    split: str  # of its row ('' for a file that failed to decode)
    size: int
    mtime_ns: int
    sha256: str
    row: int = -1  # its row in the old split's features; -1: it failed to decode (reason)
    label: int = -1
    reason: str = ""


@dataclass(frozen=True)
class Known:
    """A content some cache of these settings holds: its row there (or the reason it did not decode)."""

    source: int  # index into Reuse.sources
    split: str  # '' for a failure
    row: int  # -1: the content failed to decode (reason)
    path: str  # where that cache saw it
    label: str  # its class name there ('' for a failure)
    sha256: str
    reason: str = ""
    views: bool = False  # the row carries augmented views


@dataclass
class Reuse:
    """Which rows of a plan the caches already have: rows[split][i] is the Known row to copy for the
    plan's row i, or None to extract it. The counts say how the view changed."""

    rows: dict[str, list[Known | None]]
    sources: list[FeatureCache] = field(default_factory=list)
    changed: int = 0  # files whose content differs from what a cache of this folder recorded there
    new: int = 0  # rows to extract: content no cache knows (or, in the views split, without views)
    relabelled: int = 0  # rows of the updated cache now in another class
    renamed: int = 0  # rows of the updated cache under another path, same class
    resplit: int = 0  # rows of the updated cache under the same path in another split
    dropped: int = 0  # rows of the cache being updated whose content the folder no longer has
    classes_added: list[str] = field(default_factory=list)
    classes_removed: list[str] = field(default_factory=list)
    hashed: int = 0  # files whose content had to be hashed

    @property
    def reused(self) -> int:
        return sum(r is not None and r.row >= 0 for rows in self.rows.values() for r in rows)


@dataclass(frozen=True)
class ReuseDecision:
    """The decision, with (UPDATE only) the rows the caches give."""

    decision: Decision
    reuse: Reuse | None = None


def old_files(cache: FeatureCache) -> dict[str, OldFile]:
    """path -> OldFile for every file the cache's extract decoded (used or failed)."""
    stats = cache.file_stats or {}
    reasons = dict(cache.skipped)
    out = {}
    for split, sp in cache.splits.items():
        for i, (p, lab) in enumerate(zip(sp.paths, sp.labels)):
            st = stats.get(p)
            if st is not None:
                out[p] = OldFile(split, st.size, st.mtime_ns, st.sha256, row=i, label=int(lab))
    for p, st in stats.items():
        if p not in out and p in reasons:  # decoded and found unusable
            out[p] = OldFile("", st.size, st.mtime_ns, st.sha256, reason=reasons[p])  # no row: no split
    return out


def content_index(sources: list[FeatureCache]) -> dict[str, list[Known]]:
    """sha256 -> every row (and decode failure) of the sources with that content."""
    out: dict[str, list[Known]] = {}
    for s, cache in enumerate(sources):
        for p, o in old_files(cache).items():
            if not o.sha256:  # unreadable when extracted: matches nothing
                continue
            sp = cache.splits.get(o.split)
            label = cache.class_names[o.label] if o.row >= 0 else ""
            out.setdefault(o.sha256, []).append(Known(s, o.split, o.row, p, label, o.sha256, o.reason,
                                                      views=sp is not None and sp.views is not None))
    return out


def _stat_records(sources: list[FeatureCache], root: str) -> dict[str, OldFile]:
    """path -> OldFile of the sources made from this very folder (only there do path, size and mtime
    say which content a file holds)."""
    out: dict[str, OldFile] = {}
    for cache in reversed(sources):  # the first source (the cache being updated) wins
        if cache.meta.data_root and os.path.normpath(cache.meta.data_root) == os.path.normpath(root):
            out.update(old_files(cache))
    return out


def _pick(cands: list[Known], path: str, label: str, need_views: bool) -> Known | None:
    """The candidate row for a plan row: a decoded row before a failure, the same path, then the same class."""
    usable = [c for c in cands if c.row < 0 or c.views or not need_views]
    if not usable:
        return None
    return min(usable, key=lambda c: (c.row < 0, c.path != path, c.label != label, c.source))


def plan_digests(plan: ExtractionPlan, records: dict[str, OldFile],
                 hash_many: Callable[[list[str]], list[str]]) -> tuple[dict[str, str], int]:
    """The content hash of every plan file: the recorded one while path, size and mtime match, else
    hashed now (hash_many: relative paths -> sha256s, '' for an unreadable file). Returns (hashes, how
    many were hashed)."""
    out, todo = {}, []
    for sp in plan.splits.values():
        for p, size, mtime in zip(sp.paths, sp.sizes, sp.mtimes):
            o = records.get(p)
            if o is not None and o.sha256 and o.size == size and o.mtime_ns == mtime:
                out[p] = o.sha256
            else:
                todo.append(p)
    out.update(zip(todo, hash_many(todo)))
    return out, len(todo)


def compare_files(plan: ExtractionPlan, sources: list[FeatureCache],
                  hash_many: Callable[[list[str]], list[str]], updated: FeatureCache | None = None) -> Reuse:
    """Match the plan's rows with the rows the sources hold, by content. updated: the cache being
    replaced (for what was dropped and the class changes)."""
    records = _stat_records(sources, plan.root)
    digests, hashed = plan_digests(plan, records, hash_many)
    index = content_index(sources)
    out = Reuse({}, sources, hashed=hashed)
    names = plan.class_names
    for split, sp in plan.splits.items():
        need_views = plan.views_of(split) > 0
        rows = []
        for p, lab in zip(sp.paths, sp.labels):
            h = digests[p]
            c = _pick(index.get(h, []), p, names[lab], need_views) if h else None
            rows.append(c)
            if c is None:
                out.new += 1
                o = records.get(p)
                out.changed += o is not None and o.sha256 != h
            elif c.row >= 0 and updated is not None and c.source == 0:  # how the updated cache's view changed
                out.relabelled += c.label != names[lab]
                out.renamed += c.label == names[lab] and c.path != p
                out.resplit += c.path == p and c.split != split
        out.rows[split] = rows
    if updated is not None:
        present = set(digests.values())
        out.dropped = sum(o.row >= 0 and o.sha256 not in present for o in old_files(updated).values())
        out.classes_added = [c for c in names if c not in updated.class_names]
        out.classes_removed = [c for c in updated.class_names if c not in names]
    return out


def settings_decision(path, old: CacheAttrs, plan: ExtractionPlan, split: SplitSpec) -> Decision:
    """DONE when the cache at path was made with these settings from these very files and this split,
    UPDATE when only the folder (files, classes, split) differs; raises CacheMismatch when it was made
    with other settings."""
    check_settings(path, old, plan)
    same_split = SplitSpec.from_record(old.split) == split
    return Decision.DONE if same_split and old.files_digest == plan.files_digest else Decision.UPDATE


def check_settings(path, old: CacheAttrs, plan: ExtractionPlan, what: str = "cache") -> None:
    """Raises CacheMismatch when the cache at path was made with other settings than plan's."""
    if old.fingerprint != plan.fingerprint:
        was = f"{old.backbone}/{old.weights}/{old.precision}/views={old.views}"
        raise CacheMismatch(f"{what} {path} was made with other settings ({was}: backbone, weights, transforms, "
                            "precision or views differ); pass --force to rebuild it or choose another --cache")


def _with_records(path, cache: FeatureCache, what: str) -> FeatureCache:
    """The cache, refused when it was made before file records (its rows cannot be matched by content)."""
    if cache.file_stats is None:
        raise CacheMismatch(f"{what} {path} was made by an earlier version that did not record file sizes, times "
                            "and hashes, so its rows cannot be matched to files; pass --force to rebuild it "
                            "(train-head still reads it as it is)")
    return cache


def checked_reuse(paths, cache_path, plan: ExtractionPlan) -> list[str]:
    """The caches given to --reuse whose settings are plan's (read from their attributes alone; another's
    raises CacheMismatch with its reason), the cache path itself and repeats left out."""
    out, seen = [], {os.path.realpath(cache_path)}
    for p in paths:
        if os.path.realpath(p) in seen:
            continue
        seen.add(os.path.realpath(p))
        try:
            check_settings(p, read_attrs(p), plan, "--reuse cache")
        except CacheMismatch as e:
            raise CacheMismatch(str(e).replace("; pass --force to rebuild it or choose another --cache",
                                               "; its rows cannot be reused here: drop that --reuse")) from None
        out.append(p)
    return out


def decide(path, plan: ExtractionPlan, split: SplitSpec, force: bool = False, reuse: tuple = (),
           hash_many: Callable[[list[str]], list[str]] | None = None) -> ReuseDecision:
    """What to do about the file at path (call under its CacheLock), reusing rows of it and of the caches
    in reuse. A damaged or foreign file is replaced only with force (the error says so); a cache of other
    settings raises CacheMismatch. With force nothing is reused."""
    if force:
        return ReuseDecision(Decision.BUILD)
    try:
        old = read_attrs(path)
    except CacheMissing:
        old = None
    except CacheError as e:
        raise type(e)(f"{e}; or pass --force to replace it") from None
    done = old is not None and settings_decision(path, old, plan, split) is Decision.DONE
    reuse = checked_reuse(reuse, path, plan)
    if done:
        return ReuseDecision(Decision.DONE)
    updated = _with_records(path, read_cache(path), "cache") if old is not None else None
    sources = ([updated] if updated is not None else []) + [_with_records(p, read_cache(p), "--reuse cache")
                                                            for p in reuse]
    if not sources:
        return ReuseDecision(Decision.BUILD)
    hash_many = hash_many or (lambda paths: hash_files(Path(plan.root), paths))
    return ReuseDecision(Decision.UPDATE, compare_files(plan, sources, hash_many, updated))


def sha256_or_empty(path: Path) -> str:
    """sha256 of a file's content; '' when it cannot be read now (it then matches no recorded hash)."""
    try:
        return sha256_file(path)
    except OSError:
        return ""


def hash_files(root: Path, paths: list[str]) -> list[str]:
    """sha256_or_empty of root/p for each p; a few threads (hashlib releases the GIL)."""
    if len(paths) < 4:
        return [sha256_or_empty(root / p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda p: sha256_or_empty(root / p), paths))


def vouched_files(cache: FeatureCache, root: Path) -> dict[str, tuple[int, int]]:
    """{absolute file under root: (size, mtime_ns)} of every file the cache decoded and used: while a
    file still has that size and time, it still decodes. Only files that decoded: a failure may have
    been passing (permissions, a file being copied), and the few bad files are cheap to try again."""
    return {os.path.abspath(Path(root) / p): (f.size, f.mtime_ns) for p, f in old_files(cache).items()
            if not f.reason}

