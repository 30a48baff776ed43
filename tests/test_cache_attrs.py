"""The cache's root attributes (cache.attrs.CacheAttrs) and the reuse decision (cache.reuse), without a backbone."""
from dataclasses import replace

import h5py
import numpy as np
import pytest

from cache import CacheError, CacheInvalid, CacheMismatch, read_attrs, read_cache
from cache.attrs import CacheAttrs
from cache.plan import ExtractionPlan, SplitPlan
from cache.reuse import Decision, settings_decision
from pipeline.splits import SplitSpec
from tests.synthetic_cache import write_cache

RECORD = CacheAttrs(fingerprint="a" * 64, files_digest="b" * 64, backbone="resnet18", weights="none",
                    backbone_spec={"kind": "torchvision", "backbone": "resnet18"}, feature_dim=8,
                    class_names=("ants", "bees"), transform={"resize": 256, "spec": {"draft": False}},
                    precision="fp32", views=2, seed=7, draft=False, decoder="pil",
                    split={"layout": "folders", "val_fraction": 0.0, "test_fraction": 0.0, "seed": 0, "digest": "d"},
                    data_root="/data/hymenoptera", config={"data_dir": "data", "splits": ["train", "val"]},
                    torch="2.14.1")


def written(tmp_path, attrs: dict):
    path = tmp_path / "attrs.h5"
    with h5py.File(path, "w") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


def test_record_round_trips_through_the_file(tmp_path):
    stored = RECORD.assembled()
    path = written(tmp_path, stored.to_h5())
    assert read_attrs(path) == stored and stored.complete and stored.created
    assert list(stored.to_h5())[:3] == ["format", "fingerprint", "files_digest"]  # the order extract always wrote
    with h5py.File(path) as f:  # JSON attributes are text, numbers and flags native
        assert f.attrs["class_names"] == '["ants", "bees"]' and f.attrs["feature_dim"] == 8
        assert f.attrs["draft"] is np.False_ and f.attrs["format"] == "feature-cache/1"


def test_a_synthetic_cache_reads_back_its_record(tmp_path):
    path = write_cache(tmp_path / "c.h5", {"train": (np.ones((2, 4)), [0, 1], ["a.jpg", "b.jpg"])}, ["a", "b"],
                       data_dir=str(tmp_path / "imgs"), seed=3)
    c = read_cache(path)
    assert c.meta.class_names == ("a", "b") and c.meta.feature_dim == 4 and c.meta.seed == 3
    assert c.meta.data_root is None and c.meta.config == {"data_dir": str(tmp_path / "imgs")}
    assert c.attrs["class_names"] == '["a", "b"]'  # the attributes as stored, for dict readers


def test_a_cache_without_the_newer_attributes_reads_with_their_defaults(tmp_path):
    newer = ("files_digest", "views", "seed", "draft", "decoder", "split", "data_root", "torch", "created")
    old = {k: v for k, v in RECORD.assembled().to_h5().items() if k not in newer}
    meta = read_attrs(written(tmp_path, {**old, "written_by_a_later_version": "x"}))  # unknown: ignored
    assert (meta.files_digest, meta.views, meta.seed, meta.draft, meta.decoder, meta.split, meta.data_root) == \
        (None, 0, None, False, "pil", None, None)
    assert SplitSpec.from_record(meta.split) == SplitSpec()


@pytest.mark.parametrize("key, what", [
    ("fingerprint", "attribute fingerprint is missing or not a sha256"),
    ("class_names", "attribute class_names is missing"),
    ("backbone_spec", "attribute backbone_spec is missing"),
    ("config", "attribute config is missing"),
    ("transform", "attribute transform is missing"),
    ("backbone", "attribute backbone is missing"),
    ("weights", "attribute weights is missing"),
    ("precision", "attribute precision is missing"),
    ("feature_dim", "attribute feature_dim is None, not a number from 1 to 1048576"),
])
def test_a_missing_required_attribute_is_refused_with_its_name(tmp_path, key, what):
    path = written(tmp_path, {k: v for k, v in RECORD.assembled().to_h5().items() if k != key})
    with pytest.raises(CacheInvalid) as e:
        read_attrs(path)
    assert str(e.value) == f"cache {path} is invalid: {what}; rebuild it with: extract ... --force"


def test_a_foreign_or_incomplete_file_is_refused_as_before(tmp_path):
    good = RECORD.assembled().to_h5()
    path = written(tmp_path, {**good, "format": "feature-cache/9"})
    with pytest.raises(CacheError) as e:
        read_attrs(path)
    assert str(e.value) == (f"{path} is not a feature cache of this tool (format 'feature-cache/9', expected "
                            "'feature-cache/1'); extract into a new file")
    path = written(tmp_path, {k: v for k, v in good.items() if k != "complete"})
    with pytest.raises(CacheError, match="is incomplete; rerun the extract command to finish it"):
        read_attrs(path)


@pytest.mark.parametrize("key, value, what", [
    ("split", "{half", "attribute split is not JSON"),
    ("split", "[1]", "attribute split is not a JSON dict"),
    ("draft", "yes", "attribute draft is 'yes', not true or false"),
    ("seed", 1.5, "attribute seed is 1.5, not a number"),
    ("data_root", 3, "attribute data_root is not text"),
    ("files_digest", "abc", "attribute files_digest is not a sha256"),
])
def test_an_optional_attribute_of_the_wrong_type_is_refused(tmp_path, key, value, what):
    path = written(tmp_path, {**RECORD.assembled().to_h5(), key: value})
    with pytest.raises(CacheInvalid, match=what):
        read_attrs(path)


def test_settings_decision_from_the_record_alone():
    plan = ExtractionPlan(fingerprint="a" * 64, feature_dim=8, views=2, views_split="train",
                          class_names=["ants", "bees"], root="/data",
                          splits={"train": SplitPlan(["train/ants/1.jpg"], [0], [10], [100])})
    done = RECORD.assembled()
    spec = SplitSpec.from_record(done.split)
    assert settings_decision("c.h5", replace(done, files_digest=plan.files_digest), plan, spec) is Decision.DONE
    assert settings_decision("c.h5", done, plan, spec) is Decision.UPDATE  # other files: reuse what is unchanged
    with pytest.raises(CacheMismatch, match=r"other settings \(resnet18/none/fp32/views=2: backbone"):
        settings_decision("c.h5", replace(done, fingerprint="c" * 64), plan, spec)
    # another split of the same files is another view of the same rows: updated, not refused (issue 28)
    same_files = replace(done, files_digest=plan.files_digest)
    assert settings_decision("c.h5", same_files, plan, SplitSpec(layout="flat", val_fraction=0.2)) is Decision.UPDATE
