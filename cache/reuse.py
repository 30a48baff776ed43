"""What an existing cache is still good for: the extract's decision about the file at its cache path
(build, done, or update reusing the rows of unchanged files), and the files a cache vouches for.

`decide` reads the cache; `settings_decision` and `match_files` decide from what was read, without
touching the disk (but for the content hash they are handed, asked only for a file whose size is the
same and mtime is not)."""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.fsio import sha256_file
from pipeline.splits import SplitSpec
from pipeline.text import printable

from .attrs import CacheAttrs
from .errors import CacheError, CacheMismatch, CacheMissing
from .plan import ExtractionPlan
from .store import FeatureCache, read_attrs, read_cache


class Decision(enum.Enum):
    """What to do about the file at the cache path."""

    BUILD = "build"  # no usable cache there (or --force): extract every row
    DONE = "done"  # complete for these settings and these unchanged files
    UPDATE = "update"  # same settings; files were added or changed: reuse the rows of unchanged files


@dataclass(frozen=True)
class OldFile:
    """A file an older cache of the same settings holds, as it was when extracted."""

    split: str  # of its row ('' for a skipped file)
    size: int
    mtime_ns: int
    sha256: str
    row: int = -1  # its row in the old split's features; -1: it was skipped (reason)
    label: int = -1
    reason: str = ""


@dataclass
class Reuse:
    """Which rows of a plan an older cache already has. rows[split][i] is the OldFile to copy for the
    plan's row i, or None to extract it."""

    rows: dict[str, list[OldFile | None]]
    changed: int = 0  # files whose content differs from what the cache was made from
    new: int = 0  # files the cache does not know
    lost: list[str] = field(default_factory=list)  # cache rows whose file is gone, moved or relabelled

    @property
    def reused(self) -> int:
        return sum(r is not None for rows in self.rows.values() for r in rows)


@dataclass(frozen=True)
class ReuseDecision:
    """The decision, with (UPDATE only) the older cache as read and the rows it gives."""

    decision: Decision
    cache: FeatureCache | None = None
    reuse: Reuse | None = None


def old_files(cache: FeatureCache) -> dict[str, OldFile]:
    """path -> OldFile for every file the cache's extract decoded (used or skipped)."""
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


def compare_files(plan: ExtractionPlan, old: dict[str, OldFile], content_sha256: Callable[[str], str]) -> Reuse:
    """Match the plan's rows with an older cache's files. A row is reused only while its file is
    unchanged: same split, size and (mtime or content); a skipped file that changed is tried again."""
    out = Reuse({})
    labels = {}
    for split, sp in plan.splits.items():
        rows = []
        for p, lab, size, mtime in zip(sp.paths, sp.labels, sp.sizes, sp.mtimes):
            labels[p] = (split, lab)
            o = old.get(p)
            if o is None or (o.row >= 0 and o.split != split):
                out.new += 1
                rows.append(None)
            elif o.size != size or (o.mtime_ns != mtime and (not o.sha256 or content_sha256(p) != o.sha256)):
                out.changed += 1
                rows.append(None)
            else:
                rows.append(o)
        out.rows[split] = rows
    out.lost = sorted(p for p, o in old.items() if o.row >= 0 and labels.get(p) != (o.split, o.label))
    return out


def settings_decision(path, old: CacheAttrs, plan: ExtractionPlan, split: SplitSpec) -> Decision:
    """DONE when the cache at path was made with these settings from these very files, UPDATE when only
    files differ; raises CacheMismatch when it was made with other settings or another split."""
    old_split = SplitSpec.from_record(old.split)
    if old_split != split:
        raise CacheMismatch(f"cache {path} was made with another split ({old_split.describe()}; now "
                            f"{split.describe()}); use the same --val-fraction/--test-fraction/--split-seed, pass "
                            "--force to rebuild it, or choose another --cache")
    if old.fingerprint != plan.fingerprint:
        was = f"{old.backbone}/{old.weights}/{old.precision}/views={old.views}"
        raise CacheMismatch(f"cache {path} was made with other settings ({was}: backbone, weights, transforms, "
                            "precision or views differ); pass --force to rebuild it or choose another --cache")
    return Decision.DONE if old.files_digest == plan.files_digest else Decision.UPDATE


def match_files(path, cache: FeatureCache, plan: ExtractionPlan, data_dir: str,
                content_sha256: Callable[[str], str]) -> Reuse:
    """The rows of plan that the cache at path (same settings) can give; raises CacheMismatch when it
    cannot tell changed files apart (made before file records), has other classes or splits, or was
    made from files that were since removed, moved or relabelled."""
    if cache.file_stats is None:
        raise CacheMismatch(f"cache {path} was made by an earlier version that did not record file sizes, times "
                            "and hashes, so files changed since cannot be told apart; pass --force to rebuild it "
                            "(train-head still reads it as it is)")
    if cache.class_names != plan.class_names or set(cache.splits) != set(plan.splits):
        was, now = (f"classes {', '.join(map(printable, c))}" for c in (cache.class_names, plan.class_names)) \
            if cache.class_names != plan.class_names else (f"splits {', '.join(sorted(c))}" for c in (cache.splits, plan.splits))
        raise CacheMismatch(f"cache {path} was made for {was}, {data_dir} now has {now}; "
                            "pass --force to rebuild it or choose another --cache")
    reuse = compare_files(plan, old_files(cache), content_sha256)
    if reuse.lost:
        raise CacheMismatch(f"cache {path} was made from other files of {data_dir} (some were removed, "
                            f"moved or relabelled (first: {printable(reuse.lost[0])})); pass --force to rebuild it "
                            "or choose another --cache")
    return reuse


def decide(path, plan: ExtractionPlan, split: SplitSpec, data_dir: str, force: bool = False) -> ReuseDecision:
    """What to do about the file at path (call under its CacheLock). A damaged or foreign file is
    replaced only with force (the error says so); a mismatch raises CacheMismatch."""
    try:
        old = read_attrs(path)
    except CacheMissing:
        return ReuseDecision(Decision.BUILD)
    except CacheError as e:
        if force:
            return ReuseDecision(Decision.BUILD)
        raise type(e)(f"{e}; or pass --force to replace it") from None
    if force:
        return ReuseDecision(Decision.BUILD)
    decision = settings_decision(path, old, plan, split)
    if decision is Decision.DONE:
        return ReuseDecision(decision)
    cache = read_cache(path)
    return ReuseDecision(decision, cache, match_files(path, cache, plan, data_dir,
                                                      lambda p: sha256_or_empty(Path(plan.root) / p)))


def sha256_or_empty(path: Path) -> str:
    """sha256 of a file's content; '' when it cannot be read now (it then matches no recorded hash)."""
    try:
        return sha256_file(path)
    except OSError:
        return ""


def vouched_files(cache: FeatureCache, root: Path) -> dict[str, tuple[int, int]]:
    """{absolute file under root: (size, mtime_ns)} of every file the cache decoded and used: while a
    file still has that size and time, it still decodes. Only files that decoded: a failure may have
    been passing (permissions, a file being copied), and the few bad files are cheap to try again."""
    return {os.path.abspath(Path(root) / p): (f.size, f.mtime_ns) for p, f in old_files(cache).items()
            if not f.reason}
