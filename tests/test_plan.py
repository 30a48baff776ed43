"""Pure planning functions with small fakes: the plan's form, gaps, batches, which rows a cache can give."""
from pathlib import Path

import numpy as np
import pytest

from cache.attrs import CacheAttrs
from cache.plan import ExtractionPlan, SplitPlan
from cache.reuse import Known, OldFile, Reuse, compare_files, old_files
from cache.store import FeatureCache, FileStat, Segment, SplitData, gaps
from pipeline import PipelineError
from pipeline.data import link_refusal
from pipeline.extract import check_split_names, plan_batches, seed_from_cache


def plan(**splits) -> ExtractionPlan:
    """splits: name -> list of (path, label, size, mtime)."""
    return ExtractionPlan(fingerprint="f" * 64, feature_dim=3, views=0, views_split="train", class_names=["a", "b"],
                          root="/data", splits={k: SplitPlan(*map(list, zip(*rows))) for k, rows in splits.items()})


def test_plan_round_trips_through_json_and_its_digest_sees_size_and_mtime():
    p = plan(train=[("train/a/1.jpg", 0, 10, 100), ("train/b/2.jpg", 1, 20, 200)])
    q = ExtractionPlan.from_json(p.to_json())
    assert q == p and p.same_work(q)
    assert plan(train=[("train/a/1.jpg", 0, 10, 101), ("train/b/2.jpg", 1, 20, 200)]).files_digest != p.files_digest
    assert plan(train=[("train/a/1.jpg", 0, 11, 100), ("train/b/2.jpg", 1, 20, 200)]).files_digest != p.files_digest
    old_dict_plan = '{"fingerprint": "x", "files_digest": "y", "feature_dim": 3, "views": 0, "splits": {}}'
    assert ExtractionPlan.from_json(old_dict_plan) is None and ExtractionPlan.from_json("{not json") is None


def test_gaps_are_what_no_segment_covers():
    seg = [Segment("train", 0, 4, Path()), Segment("train", 8, 12, Path()), Segment("train", 12, 13, Path())]
    assert gaps(seg, 0, 16) == [(4, 8), (13, 16)]
    assert gaps(seg, 2, 10) == [(4, 8)]  # a shard's range
    assert gaps([], 5, 9) == [(5, 9)] and gaps(seg, 0, 4) == []


class FakeWriter:
    def __init__(self, todo: dict, k: int = 0, dim: int = 3):
        self._todo, self.k, self.segments = todo, k, []
        self.plan = type("P", (), {"feature_dim": dim})()

    def todo(self, split, lo=0, hi=None):
        return self._todo[split]

    def views_of(self, split):
        return self.k if split == "train" else 0

    def write_segment(self, split, start, features, reasons, views=None, digests=None, stats=None):
        self.segments.append((split, start, features.copy(), list(reasons), views, list(digests)))


def test_plan_batches_first_small_then_full_never_across_splits():
    w = FakeWriter({"train": [(0, 3), (5, 25)], "val": [(0, 6)]})
    batches = plan_batches(w, ["train", "val"], 10)
    assert [(b[0], len(b)) for b in batches] == [((0, 0), 3), ((0, 5), 10), ((0, 15), 10), ((1, 0), 6)]
    w = FakeWriter({"train": [(0, 20)], "val": []})
    assert [len(b) for b in plan_batches(w, ["train", "val"], 16)] == [8, 12]


def old_cache(stats: dict, skipped=()) -> FeatureCache:
    meta = CacheAttrs(fingerprint="f" * 64, backbone="x", weights="none", backbone_spec={}, feature_dim=3,
                      class_names=("a", "b"), transform={}, precision="fp32", data_root="/data")
    c = FeatureCache(Path("old.h5"), meta)
    c.splits["train"] = SplitData(features=np.arange(9, dtype=np.float32).reshape(3, 3), labels=np.array([0, 0, 1]),
                                  paths=["train/a/1.jpg", "train/a/2.jpg", "train/b/3.jpg"])
    c.skipped = list(skipped)
    c.file_stats = stats
    return c


STATS = {"train/a/1.jpg": FileStat(10, 100, "h1"), "train/a/2.jpg": FileStat(20, 200, "h2"),
         "train/b/3.jpg": FileStat(30, 300, "h3"), "train/b/bad.jpg": FileStat(4, 400, "hb")}


def test_compare_files_hashes_only_files_whose_stat_matches_no_record():
    c = old_cache(STATS, [("train/b/bad.jpg", "truncated image file")])
    assert old_files(c)["train/b/bad.jpg"] == OldFile("", 4, 400, "hb", reason="truncated image file")
    p = plan(train=[("train/a/1.jpg", 0, 10, 100),  # unchanged: no hash
                    ("train/a/2.jpg", 0, 20, 999),  # touched, same bytes
                    ("train/a/new.jpg", 0, 5, 5),  # new content
                    ("train/b/3.jpg", 1, 31, 300),  # rewritten with other bytes
                    ("train/b/bad.jpg", 1, 4, 401)])  # a failed file rewritten (repaired)
    asked = []

    def hash_many(paths):
        asked.extend(paths)
        return [{"train/a/2.jpg": "h2", "train/b/bad.jpg": "repaired"}.get(p, "other-" + p) for p in paths]

    r = compare_files(p, [c], hash_many, c)
    assert asked == ["train/a/2.jpg", "train/a/new.jpg", "train/b/3.jpg", "train/b/bad.jpg"]
    assert [o.row if o else None for o in r.rows["train"]] == [0, 1, None, None, None]
    assert (r.reused, r.changed, r.new, r.dropped) == (2, 2, 3, 1)  # train/b/3.jpg's content is gone


def test_compare_files_follows_content_to_other_paths_labels_and_splits():
    c = old_cache(STATS)
    p = plan(train=[("train/b/1.jpg", 1, 10, 7),  # moved a -> b: relabelled
                    ("train/a/renamed.jpg", 0, 20, 7),  # renamed
                    ("train/a/copy.jpg", 0, 20, 8)],  # the same bytes again: a row of its own
             val=[("train/b/3.jpg", 1, 30, 300)])  # same path, same stat, another split
    r = compare_files(p, [c], lambda paths: [{"train/b/1.jpg": "h1"}.get(q, "h2") for q in paths], c)
    assert [(o.split, o.row) for o in r.rows["train"]] == [("train", 0), ("train", 1), ("train", 1)]
    assert (r.rows["val"][0].split, r.rows["val"][0].row) == ("train", 2)
    assert (r.reused, r.new, r.relabelled, r.renamed, r.resplit, r.dropped) == (4, 0, 1, 2, 1, 0)


def test_seed_from_cache_writes_one_segment_per_run_of_reused_rows():
    c = old_cache(STATS, [("train/b/bad.jpg", "truncated")])
    k2 = Known(0, "train", 1, "train/a/2.jpg", "a", "h2")
    kb = Known(0, "", -1, "train/b/bad.jpg", "", "hb", "truncated")
    k1 = Known(0, "train", 0, "train/a/1.jpg", "a", "h1")
    reuse = Reuse({"train": [k2, None, kb, k1, None]}, [c])
    w = FakeWriter({"train": [(0, 5)]})
    assert seed_from_cache(w, reuse) == 3
    (s1, start1, f1, r1, _, d1), (s2, start2, f2, r2, _, d2) = w.segments
    assert (s1, start1, r1, d1) == ("train", 0, [""], ["h2"]) and f1.tolist() == [[3, 4, 5]]
    assert (start2, r2, d2) == (2, ["truncated", ""], ["hb", "h1"]) and f2.tolist() == [[0, 0, 0], [0, 1, 2]]
    w = FakeWriter({"train": [(3, 5)]})  # a rerun after a kill: rows 0..3 are segments already
    assert seed_from_cache(w, reuse) == 1 and w.segments[0][1] == 3


@pytest.mark.parametrize("name", ["", ".", "..", "/abs", "../x", "a/b", ".hidden", "skipped", "file_stats", "x\ny"])
def test_split_names_must_be_plain_folder_names(name):
    with pytest.raises(PipelineError, match="--splits"):
        check_split_names(["train", name])
    with pytest.raises(PipelineError, match="named twice"):
        check_split_names(["train", "val", "train"])
    check_split_names(["train", "val", "test-2"])


def test_link_refusal_rules():
    scanned = ("/d/train", "/d/val")
    assert link_refusal("/elsewhere", "/d", scanned, set()).startswith("link to a folder outside DATA_DIR")
    assert link_refusal("/d", "/d", scanned, set()).startswith("link to a folder that is scanned anyway")
    assert link_refusal("/d/val/a", "/d", scanned, set()).startswith("link to a folder that is scanned anyway")
    assert link_refusal("/d/pool", "/d", scanned, {"/d/pool"}).startswith("link to a folder already scanned")
    assert link_refusal("/d/pool", "/d", scanned, set()) == ""
    assert link_refusal("/d/trainee", "/d", scanned, set()) == ""  # a prefix of a name is not a parent
