"""Hostile data folders at scan time: link loops and links out of DATA_DIR, names that are not UTF-8 or
hold control codes, the tool's own files inside the data folder."""
import os

import pytest

from pipeline import PipelineError
from pipeline.data import scan_dataset, scan_files
from pipeline.text import printable
from tests.conftest import make_dataset, write_image


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "d", {"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}})


def test_link_loop_and_links_out_of_data_dir_are_not_followed(data, tmp_path):
    outside = tmp_path / "outside"
    write_image(outside / "secret.jpg", 0, 50)
    pool = data / ".pool"  # hidden: a visible image folder beside train/ and val/ is a mixed layout
    write_image(pool / "extra.jpg", 0, 51)
    os.symlink("..", data / "train/ants/loop")  # -> train: the issue's loop
    os.symlink("../../..", data / "train/ants/up")  # -> tmp_path: outside DATA_DIR
    os.symlink(outside, data / "train/ants/out")
    os.symlink("../bees", data / "train/ants/sibling")  # would label bees as ants
    os.symlink("../../.pool", data / "train/ants/more")  # inside DATA_DIR, not a split: followed
    os.symlink("../../.pool", data / "train/bees/again")  # the same folder a second time: not followed
    os.symlink(outside / "secret.jpg", data / "train/bees/linked.jpg")  # a file link: followed
    ds = scan_dataset(data, ["train", "val"])
    tr = ds.splits["train"]
    assert tr.paths == ["train/ants/img_000.jpg", "train/ants/img_001.jpg", "train/ants/more/extra.jpg",
                        "train/bees/img_000.jpg", "train/bees/img_001.jpg", "train/bees/linked.jpg"]
    assert tr.labels == [0, 0, 0, 1, 1, 1]
    assert tr.skipped == [
        ("train/ants/loop", "link to a folder that is scanned anyway (a loop or a duplicate; not followed)"),
        ("train/ants/out", "link to a folder outside DATA_DIR (not followed)"),
        ("train/ants/sibling", "link to a folder that is scanned anyway (a loop or a duplicate; not followed)"),
        ("train/ants/up", "link to a folder outside DATA_DIR (not followed)"),
        ("train/bees/again", "link to a folder already scanned through another path (not followed)"),
    ]
    assert ds.splits["val"].paths == ["val/ants/img_000.jpg", "val/bees/img_000.jpg"]
    assert len(tr.sizes) == len(tr.mtimes) == 6 and tr.sizes[5] == (outside / "secret.jpg").stat().st_size


def test_class_folder_linked_out_of_data_dir_or_into_another_split_is_refused(data, tmp_path):
    write_image(tmp_path / "elsewhere/x.jpg", 0, 52)
    os.symlink(tmp_path / "elsewhere", data / "train/wasps")
    with pytest.raises(PipelineError, match=r"class folder .*train/wasps is a link to a folder outside DATA_DIR"):
        scan_dataset(data, ["train", "val"])
    os.unlink(data / "train/wasps")
    os.symlink("../val/bees", data / "train/wasps")
    with pytest.raises(PipelineError, match=r"train/wasps is a link to a folder that is scanned anyway"):
        scan_dataset(data, ["train", "val"])


def test_predict_folder_walk_does_not_loop(tmp_path):
    write_image(tmp_path / "in/a.jpg", 0, 1)
    os.symlink("..", tmp_path / "in/loop")
    files, skipped = scan_files([str(tmp_path / "in")])
    assert files == [tmp_path / "in/a.jpg"]
    assert skipped == [(str(tmp_path / "in/loop"),
                        "link to a folder that is scanned anyway (a loop or a duplicate; not followed)")]


def test_names_not_utf8_and_control_codes(data):
    bad = os.path.join(os.fsencode(data / "train/ants"), b"bad\xff\xfe.jpg")
    with open(bad, "wb") as f:
        f.write((data / "train/ants/img_000.jpg").read_bytes())
    write_image(data / "train/bees/new\nline\x1b[31m.jpg", 1, 60)
    ds = scan_dataset(data, ["train", "val"])
    tr = ds.splits["train"]
    assert tr.skipped == [("train/ants/bad\\xff\\xfe.jpg", "file name is not valid UTF-8 (rename it)")]
    assert "train/bees/new\nline\x1b[31m.jpg" in tr.paths  # a valid name: used, shown escaped
    assert printable("train/bees/new\nline\x1b[31m.jpg") == "train/bees/new\\nline\\x1b[31m.jpg"
    os.mkdir(os.path.join(os.fsencode(data / "train"), b"cls\xff"))
    with pytest.raises(PipelineError, match=r"class folder .*cls\\xff has a name that is not valid UTF-8"):
        scan_dataset(data, ["train", "val"])


def test_printable_keeps_letters_and_escapes_controls():
    assert printable("fourmi_été_蜂.jpg") == "fourmi_été_蜂.jpg"
    assert printable("a\tb\rc\x00d\x7fe\u202egnp.jpg") == "a\\tb\\rc\\x00d\\x7fe\\u202egnp.jpg"


def test_an_unfinished_extract_inside_the_data_folder_is_not_a_class(data):
    partial = data / "train/feats.h5.partial"
    partial.mkdir()
    (partial / "plan.json").write_text("{}")
    (partial / "train-000000000-000000004.npz").write_bytes(b"x")
    ds = scan_dataset(data, ["train", "val"])
    assert ds.class_names == ["ants", "bees"]
    assert all("partial" not in p for p, _ in ds.splits["train"].skipped)
