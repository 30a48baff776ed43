"""The extraction plan: which files become which rows, with what backbone. Pure data (no h5py, no torch).

It is the one record of an extract's intent: the .partial folder's plan.json is its serialised form, a
resumed run continues only the same plan, and the final cache's files_digest is its files_digest.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from pipeline.fsio import sha256_json

PLAN_VERSION = 2  # 1: the dict of earlier versions (no sizes/mtimes); never resumed, its folder is redone


@dataclass
class SplitPlan:
    """The rows of one split, in order; sizes and mtimes (ns) from the scan's os.stat of each file."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def files_digest(class_names: list[str], splits: dict[str, SplitPlan]) -> str:
    """Digest of the class names and every (path, label, size, mtime_ns) of every split: two scans with
    the same digest saw the same files, unchanged."""
    return sha256_json({"classes": list(class_names),
                        "splits": {k: [list(v.paths), list(v.labels), list(v.sizes), list(v.mtimes)]
                                   for k, v in splits.items()}})


@dataclass
class ExtractionPlan:
    fingerprint: str  # what computes a feature (backbone, weights, transform, precision, views)
    feature_dim: int
    views: int  # augmented views per row of views_split
    views_split: str
    class_names: list[str]
    root: str  # the data folder (absolute): row paths are relative to it
    splits: dict[str, SplitPlan]
    files_digest: str = ""
    version: int = PLAN_VERSION

    def __post_init__(self):
        if not self.files_digest:
            self.files_digest = files_digest(self.class_names, self.splits)

    def views_of(self, split: str) -> int:
        return self.views if split == self.views_split else 0

    def rows(self, split: str) -> int:
        return len(self.splits[split])

    def same_work(self, other: "ExtractionPlan | None") -> bool:
        """True when other's finished segments are valid rows of this plan."""
        return other is not None and all(getattr(self, k) == getattr(other, k) for k in
                                         ("version", "fingerprint", "files_digest", "feature_dim", "views",
                                          "views_split"))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ExtractionPlan | None":
        """The plan text of a .partial folder; None when it is not one of this version (it is redone)."""
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("version") != PLAN_VERSION:
                return None
            d["splits"] = {k: SplitPlan(**v) for k, v in d["splits"].items()}
            return cls(**d)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
