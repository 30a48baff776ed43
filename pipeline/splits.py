"""The split of a flat folder (DATA_DIR/<class>/*.jpg) into train / val / test, and its record.

Each file's split is a pure function of (its path relative to DATA_DIR, the split seed): a sha256 of
both, read as a number u uniform in [0, 1), gives val when u < val_fraction, test when
val_fraction <= u < val_fraction + test_fraction, train otherwise. So:

- adding (or removing) photos never moves another file between splits: guaranteed, by construction;
  this is also what lets extract reuse a cache for a folder that only gained files;
- adding a test fraction later only takes files from train: val stays the same;
- extract, run and finetune call the same function, so the same folder and flags give the same split.

The price: a class's val count is Binomial(n, val_fraction), not exactly round(f * n). No rule can
have both. If adding a file never moves the others, then (adding files one at a time) a file's split
cannot depend on which other files exist, so it is a function of that file alone, and a folder made of
files that function sends to val is all val. A rule that puts exactly round(f * n) files of each class
in val (the lowest hashes, say) has to move an old file whenever the newcomers' share is off: over
2000 random folders at f = 0.2, adding 10% more photos moved at least one old file in 58-85% of the
cases for classes of 30-400 images (benchmarks/split_stability.py). Stability is what the cache and
comparable val numbers need, so it is guaranteed here; the balance is the binomial one (a class of
120 images gets 24 +- 4.4 val images, 1 sd), every split of every class must get at least one image
(else a clear error), `info` shows the rows per split and class, and every accuracy carries its 95%
interval.

Torch-free on purpose: `info` and the CLI read the record without importing torch.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from . import PipelineError
from .fsio import sha256_json

# A few hundred photos: 20% for val keeps 80% for training and gives val enough images for an
# interval a user can act on (80 val images at 90% accuracy: 95% CI about 0.81-0.95). fastai's
# RandomSplitter uses the same default.
DEFAULT_VAL_FRACTION = 0.2
SPLIT_FOLDERS = ("train", "val", "test")
FLAT, FOLDERS = "flat", "folders"


DEFAULT_SPLITS = ("train", "val")  # --splits when not given: also exactly what a flat folder's split gives


class LayoutError(PipelineError):
    """DATA_DIR mixes class folders with split folders, or flags that do not fit its layout."""


class LayoutFlagError(LayoutError):
    """A flag that does not fit DATA_DIR's layout (--val-fraction on split folders, --splits on a flat
    folder): a usage error, reported as one (exit 2)."""


class TooFewImagesError(PipelineError):
    """A class of a flat folder is too small to give every split at least one image."""


@dataclass(frozen=True)
class SplitSpec:
    """How a dataset was split: its own train/ val/ folders, or a flat folder split by hash."""

    layout: str = FOLDERS
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0

    @classmethod
    def from_record(cls, record: str | dict | None) -> "SplitSpec":
        """The spec in a cache's or run folder's split record (JSON text or dict; other keys such as the
        digest are ignored); absent (made before flat folders existed) = the folder's own split."""
        if not record:
            return cls()
        d = json.loads(record) if isinstance(record, str) else record
        return cls(**{k: d[k] for k in ("layout", "val_fraction", "test_fraction", "seed") if k in d})

    def splits(self) -> tuple[str, ...]:
        return ("train", "val") + (("test",) if self.test_fraction > 0 else ())

    def describe(self) -> str:
        if self.layout == FOLDERS:
            return "split: the folder's own train/ val/ (test/) folders"
        test = f", test {self.test_fraction:g}" if self.test_fraction > 0 else ""
        return (f"split: flat class folders, per-file hash (val {self.val_fraction:g}{test}, split seed {self.seed}; "
                "stable as the folder grows)")


def flat_spec(val_fraction: float | None, test_fraction: float | None, seed: int) -> SplitSpec:
    """The spec for a flat folder from the user's flags (None = default), checked."""
    val = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
    test = 0.0 if test_fraction is None else float(test_fraction)
    if not 0 < val < 1:
        raise PipelineError(f"--val-fraction must be between 0 and 1 (exclusive), got {val:g}")
    if not 0 <= test < 1:
        raise PipelineError(f"--test-fraction must be between 0 and 1, got {test:g}")
    if val + test >= 1:
        raise PipelineError(f"--val-fraction {val:g} + --test-fraction {test:g} leave nothing to train on; "
                            "keep their sum below 1")
    return SplitSpec(FLAT, val, test, int(seed))


def unit_hash(rel_path: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, relative path) alone: the first 8 bytes of a sha256."""
    digest = hashlib.sha256(f"{seed}\0{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def assign(rel_path: str, spec: SplitSpec) -> str:
    """The split of one file of a flat folder: val, test or train."""
    u = unit_hash(rel_path, spec.seed)
    if u < spec.val_fraction:
        return "val"
    if u < spec.val_fraction + spec.test_fraction:
        return "test"
    return "train"


def check_class_split(cls: str, counts: dict[str, int], spec: SplitSpec) -> None:
    """Every split of a class needs an image: a val or test split without one measures nothing for it,
    a train split without one cannot teach it."""
    n = sum(counts.values())
    needed = spec.splits()
    if n < len(needed):
        raise TooFewImagesError(
            f"class {cls!r} has {n} image{'s' * (n != 1)}: too few to split into {' and '.join(needed)} "
            f"(each needs at least one); add images to it or give the folder train/ and val/ folders")
    for s in needed:
        if counts.get(s, 0) == 0:
            share = {"val": spec.val_fraction, "test": spec.test_fraction}.get(
                s, 1 - spec.val_fraction - spec.test_fraction)
            count = share * n
            expected = f"{share:g} of {n} = {f'{count:.1f}' if count >= 0.05 else f'{count:.2g}'} expected"
            if share * n < 0.5:  # no seed is likely to help: the fraction itself leaves this split (nearly) empty
                raise TooFewImagesError(f"class {cls!r} has {n} images and {_fraction_cause(s, spec)} too few of them "
                                        f"for {s} ({expected}); {_fraction_advice(s, spec)}, or add images to it")
            raise TooFewImagesError(
                f"class {cls!r} has {n} images and none of them falls into {s} with split seed {spec.seed} "
                f"({expected}); add images to it, or pick another --split-seed")


def _fraction_cause(split: str, spec: SplitSpec) -> str:
    """The flags that make split's share small, with their values and a verb."""
    if split == "val":
        return f"--val-fraction {spec.val_fraction:g} gives"
    if split == "test":
        return f"--test-fraction {spec.test_fraction:g} gives"
    if spec.test_fraction > 0:
        return f"--val-fraction {spec.val_fraction:g} and --test-fraction {spec.test_fraction:g} leave"
    return f"--val-fraction {spec.val_fraction:g} leaves"


def _fraction_advice(split: str, spec: SplitSpec) -> str:
    return {"val": "raise --val-fraction", "test": "raise --test-fraction"}.get(
        split, "lower --val-fraction" + (" or --test-fraction" if spec.test_fraction > 0 else ""))


def cache_record(text: str | None) -> dict:
    """The split record stored in a cache's attrs (JSON); a cache made before flat folders existed used
    its folder's own split and has no digest."""
    return json.loads(text) if text else {**asdict(SplitSpec()), "digest": None}


def membership_digest(splits: dict[str, list[str]]) -> str:
    """sha256 of which files are in which split: equal digests = the very same split."""
    return sha256_json({k: sorted(v) for k, v in splits.items()})
