"""Files an operating system writes beside photos (Thumbs.db, desktop.ini, ...) are ignored like .DS_Store:
never listed, never counted as skipped images against --max-skipped."""
from click.testing import CliRunner

from cli import cli
from pipeline.data import scan_dataset, scan_files
from tests.conftest import make_dataset

SYSTEM = ["Thumbs.db", "desktop.ini", "ehthumbs.db", "Desktop.ini", ".DS_Store", "Icon\r"]


def with_system_files(root):
    for folder in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        for name in SYSTEM:
            (folder / name).write_bytes(b"\x00system")
    (root / "train" / "__MACOSX").mkdir()  # a zip's AppleDouble folder is no class
    (root / "train" / "__MACOSX" / "._img.jpg").write_bytes(b"\x00")
    return root


def test_system_files_are_not_skipped_images(tmp_path):
    data = with_system_files(make_dataset(tmp_path / "d", {"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}}))
    scanned = scan_dataset(data, ["train", "val"])
    assert scanned.class_names == ["ants", "bees"]
    assert [sp.skipped for sp in scanned.splits.values()] == [[], []]
    files, skipped = scan_files([str(data / "val")])
    assert len(files) == 2 and skipped == []
    (data / "train" / "ants" / "notes.txt").write_text("mine")  # a real stray file still counts
    r = CliRunner().invoke(cli, ["extract", str(data), "--cache", str(tmp_path / "f.h5"), "--weights", "none",
                                 "--workers", "0", "--max-skipped", "1"])
    assert r.exit_code == 0, r.output
    assert "| skipped 1 |" in r.output and "notes.txt" in r.output and "Thumbs.db" not in r.output
