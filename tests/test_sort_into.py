"""predict --min-confidence and --sort-into: unsure photos, photos sorted into class folders, sources untouched."""
import csv
import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import cli
from pipeline.sorting import MARKER, class_folders, safe_folder_name
from tests.conftest import SMALL, head_run_folder, write_image


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    return head_run_folder(tmp_path_factory.mktemp("sort"), SMALL, "--recipe", "tutorial", "--epochs", "2")[1]


def photos(root: Path) -> Path:
    """A source tree: 9 photos in nested folders, two pairs of equal names, a broken file and a text file."""
    for i, rel in enumerate(["a/x.jpg", "b/x.jpg", "b/deep/X.jpg", "a/y.png", "c/1.jpg", "c/2.jpg", "c/3.jpg",
                             "c/4.jpg", "top.jpg"]):
        write_image(root / rel, i % 2, 100 + i)
    (root / "a/broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("x")
    return root


def tree_digest(root: Path) -> str:
    """Names, kinds, link targets and contents of everything under root (links not followed)."""
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            p = os.path.join(d, name)
            st = os.lstat(p)
            h.update(f"{os.path.relpath(p, root)}|{st.st_mode}|".encode())
            if os.path.islink(p):
                h.update(os.readlink(p).encode())
            elif os.path.isfile(p):
                h.update(Path(p).read_bytes())
    return h.hexdigest()


def sort_cmd(run, src, out, *extra):
    return CliRunner().invoke(cli, ["predict", str(run), *map(str, src), "--sort-into", str(out), *extra])


def placed(out: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(d.iterdir()) for d in out.iterdir() if d.is_dir()}


def test_min_confidence_labels_unsure_in_table_and_json(head_run, tmp_path):
    src = photos(tmp_path / "src")
    r = CliRunner().invoke(cli, ["predict", str(head_run), str(src / "c"), "--json", "--min-confidence", "1"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert len(rows) == 4 and all(p["class"] == "unsure" and p["unsure"] is True for p in rows)
    assert all(p["best_guess"] in ("ants", "bees") and p["probability"] < 1 for p in rows)
    r = CliRunner().invoke(cli, ["predict", str(head_run), str(src / "c"), "--json", "--min-confidence", "0"])
    rows = json.loads(r.stdout)
    assert all(p["class"] in ("ants", "bees") and "unsure" not in p and "best_guess" not in p for p in rows)
    # a threshold between the photos' probabilities splits them exactly there
    probs = sorted(p["probability"] for p in rows)
    cut = (probs[1] + probs[2]) / 2
    r = CliRunner().invoke(cli, ["predict", str(head_run), str(src / "c"), "--min-confidence", f"{cut}"])
    lines = r.stdout.splitlines()[1:]
    assert sum(" unsure " in line and "(best guess: " in line for line in lines) == 2
    r = CliRunner().invoke(cli, ["predict", str(head_run), str(src / "c"), "--min-confidence", "1.5"])
    assert r.exit_code == 2 and "1.5" in r.output


def test_sort_into_places_every_photo_once_and_never_changes_the_sources(head_run, tmp_path):
    src = photos(tmp_path / "src")
    before = tree_digest(src)
    out = tmp_path / "sorted"
    r = sort_cmd(head_run, [src], out, "--min-confidence", "0.5001")
    assert r.exit_code == 0, r.output
    assert tree_digest(src) == before
    got = placed(out)
    assert set(got) <= {"ants", "bees", "unsure"}
    links = [p for ps in got.values() for p in ps]
    assert len(links) == 9 and all(p.is_symlink() and os.path.isabs(os.readlink(p)) for p in links)
    targets = sorted(os.readlink(p) for p in links)
    images = sorted(str(p) for p in src.rglob("*") if p.suffix in (".jpg", ".png") and p.name != "broken.jpg")
    assert targets == images  # each photo exactly once
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 11
    bad = {Path(r["path"]).name: r["error"] for r in rows if r["error"]}
    assert set(bad) == {"broken.jpg", "notes.txt"} and bad["broken.jpg"].startswith("not a readable image")
    for row in rows:
        if not row["error"]:
            assert os.readlink(out / row["file"]) == os.path.abspath(row["path"])
            assert row["class"] == ("unsure" if float(row["probability"]) < 0.5001 else row["best_class"])
    xs = [p for p in links if p.name.lower().startswith("x")]  # x.jpg, x.jpg, X.jpg: never one lost
    assert len(xs) == 3 and len({(p.parent.name, p.name.lower()) for p in xs}) == 3
    assert "not sorted" in r.output and "broken.jpg" in r.output and f"sorted 9 photos into {out}" in r.output


def test_sort_into_copy_makes_files_equal_to_the_photos(head_run, tmp_path):
    src = photos(tmp_path / "src")
    out = tmp_path / "copies"
    r = sort_cmd(head_run, [src / "c", src / "top.jpg", src / "c/1.jpg", src / "c"], out, "--copy")
    assert r.exit_code == 0, r.output
    files = [p for ps in placed(out).values() for p in ps]
    assert len(files) == 5 and not any(p.is_symlink() for p in files)  # photos named twice: placed once
    assert "5 inputs named a photo already listed" in r.output
    assert sorted(p.read_bytes() for p in files) == sorted(p.read_bytes() for p in [*(src / "c").iterdir(),
                                                                                       src / "top.jpg"])
    r = CliRunner().invoke(cli, ["predict", str(head_run), str(src), "--copy"])
    assert r.exit_code == 2 and "--copy goes with --sort-into" in r.output


def test_sort_into_refuses_an_earlier_sort_a_full_folder_and_a_run_folder(head_run, tmp_path):
    src = photos(tmp_path / "src")
    out = tmp_path / "sorted"
    assert sort_cmd(head_run, [src / "c"], out).exit_code == 0
    write_image(src / "c/5.jpg", 0, 7)  # photos added since: a re-run into the same OUT is refused, OUT unchanged
    before = tree_digest(out)
    r = sort_cmd(head_run, [src / "c"], out)
    assert r.exit_code == 1 and "holds an earlier sort" in r.output and len(r.output.strip().splitlines()) == 1
    assert tree_digest(out) == before
    full = tmp_path / "full"
    full.mkdir()
    (full / "mine.txt").write_text("keep")
    r = sort_cmd(head_run, [src / "c"], full)
    assert r.exit_code == 1 and "is not empty" in r.output and os.listdir(full) == ["mine.txt"]
    r = sort_cmd(head_run, [src / "c"], head_run / "sorted")
    assert r.exit_code == 1 and "run folder" in r.output and not (head_run / "sorted").exists()
    r = sort_cmd(head_run, [src / "c"], src / "top.jpg")
    assert r.exit_code != 0 and tree_digest(src) == tree_digest(src)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sort_cmd(head_run, [src / "c"], empty).exit_code == 0 and (empty / MARKER).is_file()


def test_sort_into_a_folder_inside_the_sources_is_never_sorted_again(head_run, tmp_path):
    src = photos(tmp_path / "src")
    r = sort_cmd(head_run, [src], src / "sorted")
    assert r.exit_code == 0, r.output
    assert sum(len(ps) for ps in placed(src / "sorted").values()) == 9
    r = sort_cmd(head_run, [src], tmp_path / "again")
    assert r.exit_code == 0, r.output
    assert sum(len(ps) for ps in placed(tmp_path / "again").values()) == 9  # not 18: the first sort is left out
    assert "left out" in r.output and "earlier sort" in r.output


def test_class_folders_are_safe_and_distinct():
    names = ["ants", "Ants", "a/b", "..", ".hidden", "", "CON", "unsure", "predictions.csv", "x\x1b[31m\n", "é" * 300]
    got = class_folders(names)
    folders = list(got.values())
    assert len({f.casefold() for f in folders}) == len(names)
    assert got["ants"] == "ants" and got["Ants"] == "Ants-2" and got["unsure"] == "unsure-2"
    assert got["a/b"] == "a_b" and got[".."] == "class" and got[".hidden"] == "_hidden" and got["CON"] == "CON_"
    assert got["predictions.csv"] == "predictions.csv-2" and got["x\x1b[31m\n"] == "x_[31m_" and got[""] == "class-2"
    for f in folders:
        assert "/" not in f and not f.startswith(".") and len(f) <= 100 and f.isprintable()
    assert safe_folder_name("bees") == "bees"
