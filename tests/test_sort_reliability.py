"""predict --sort-into under failure: the file read is the file placed, copies land whole or not at all, an
interrupted or failed sort is finished by the same command, and nothing is predicted before OUT is known
to be writable. Also: an empty path is refused by every command."""
import csv
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import cli
from pipeline.sorting import JOURNAL, MARKER
from tests.conftest import REPO, SMALL, head_run_folder, write_image
from tests.test_sort_into import photos, placed, sort_cmd, tree_digest


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    return head_run_folder(tmp_path_factory.mktemp("sortrel"), SMALL, "--recipe", "tutorial", "--epochs", "2")[1]


def rows_of(out: Path) -> list[dict]:
    with open(out / "predictions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def marker(out: Path) -> dict:
    return json.loads((out / MARKER).read_text())


def every_file(out: Path) -> list[str]:
    """Every name under OUT's class folders, hidden temp files included."""
    return sorted(f"{d.name}/{f.name}" for d in out.iterdir() if d.is_dir() for f in d.iterdir())


def test_a_path_through_a_link_and_dotdot_places_the_photo_it_classified(head_run, tmp_path):
    """X/lnk/../other.jpg is X/deep/other.jpg to the OS (lnk -> deep/sub); collapsed as text it was X/other.jpg."""
    x = tmp_path / "X"
    (x / "deep/sub").mkdir(parents=True)
    os.symlink(x / "deep/sub", x / "lnk")
    real = write_image(x / "deep/other.jpg", 1, 5)
    decoy = write_image(x / "other.jpg", 0, 6)
    assert real.read_bytes() != decoy.read_bytes()
    given = f"{x}/lnk/../other.jpg"
    for extra in ([], ["--copy"]):
        out = tmp_path / f"out{len(extra)}"
        r = sort_cmd(head_run, [given], out, *extra)
        assert r.exit_code == 0, r.output
        (f,) = [p for ps in placed(out).values() for p in ps]
        if extra:
            assert f.read_bytes() == real.read_bytes()
        else:
            assert os.readlink(f) == str(real)
        (row,) = rows_of(out)
        assert row["path"] == given and row["file"] == f"{f.parent.name}/{f.name}"
    # the table of a plain predict reads the same file: same probability as the real photo named directly
    r1 = CliRunner().invoke(cli, ["predict", str(head_run), given, "--json"])
    r2 = CliRunner().invoke(cli, ["predict", str(head_run), str(real), "--json"])
    assert json.loads(r1.stdout)[0]["probabilities"] == json.loads(r2.stdout)[0]["probabilities"]


def failing_copy(at: int, written: int, error: BaseException):
    """(shutil.copyfileobj that writes `written` bytes of its at-th photo then raises error, its calls)."""
    real, calls = shutil.copyfileobj, []

    def copy(fin, fout, length=0):
        calls.append(1)
        if len(calls) == at:
            fout.write(fin.read(written))
            raise error
        return real(fin, fout, length)

    return copy, calls


def test_a_full_disk_midway_leaves_no_piece_and_the_rerun_finishes(head_run, tmp_path, monkeypatch):
    src = photos(tmp_path / "src")
    out = tmp_path / "sorted"
    real = shutil.copyfileobj
    # half of the 4th photo is written, then the disk is full
    disk_fills, calls = failing_copy(4, 300, OSError(errno.ENOSPC, "No space left on device"))
    monkeypatch.setattr(shutil, "copyfileobj", disk_fills)
    r = sort_cmd(head_run, [src], out, "--copy")
    assert r.exit_code == 1
    assert "Error: 6 photos could not be placed (not placed: No space left on device); the sort is unfinished: " \
           "rerun the same command to place them" in r.output
    assert len(calls) == 4  # stopped at the full disk: no more attempts
    names = every_file(out)
    assert len(names) == 3 and not any(n.split("/")[1].startswith(".") for n in names)  # no temp, no piece
    assert marker(out)["finished"] is False and (out / JOURNAL).is_file()
    rows = rows_of(out)
    errors = [row["error"] for row in rows if row["error"].startswith("not placed")]
    assert len(rows) == 11 and errors == ["not placed: No space left on device"] + 5 * [
        "not placed: the sort stopped at a full disk (No space left on device)"]
    monkeypatch.setattr(shutil, "copyfileobj", real)
    before = {n: (out / n).read_bytes() for n in names}
    r = sort_cmd(head_run, [src], out, "--copy")
    assert r.exit_code == 0, r.output
    assert "sorted 9 photos" in r.output and "3 of these photos were placed by its earlier run" in r.output
    files = [p for ps in placed(out).values() for p in ps]
    assert len(files) == 9 and {n: (out / n).read_bytes() for n in names} == before
    images = [p for p in src.rglob("*") if p.suffix in (".jpg", ".png") and p.name != "broken.jpg"]
    assert sorted(p.read_bytes() for p in files) == sorted(p.read_bytes() for p in images)  # each once, whole
    assert marker(out)["finished"] is True and not (out / JOURNAL).exists()
    assert len(rows_of(out)) == 11 and all(row["file"] for row in rows_of(out) if not row["error"])
    r = sort_cmd(head_run, [src], out, "--copy")
    assert r.exit_code == 1 and "holds an earlier sort" in r.output


def test_ctrl_c_during_a_copy_leaves_no_piece_and_the_same_command_resumes(head_run, tmp_path, monkeypatch):
    src = photos(tmp_path / "src")
    out = tmp_path / "sorted"
    real = shutil.copyfileobj
    interrupted, _ = failing_copy(2, 200, KeyboardInterrupt())
    monkeypatch.setattr(shutil, "copyfileobj", interrupted)
    r = sort_cmd(head_run, [src / "c"], out, "--copy")
    assert r.exit_code == 1 and "interrupted; rerun the same command to resume" in r.output
    assert len(every_file(out)) == 1 and marker(out)["finished"] is False
    monkeypatch.setattr(shutil, "copyfileobj", real)
    # another run or other options do not finish it: the message says which command does
    r = sort_cmd(head_run, [src / "c"], out)
    assert r.exit_code == 1 and "holds an unfinished sort of run" in r.output and "--copy" in r.output
    assert "finish it with that run and those options" in r.output and len(every_file(out)) == 1
    folder = out / every_file(out)[0].split("/")[0]
    (folder / ".2.jpg.tmp-4242-0123abcd").write_bytes(b"a piece left by a kill -9")  # fsio.temp_name's form
    r = sort_cmd(head_run, [src / "c"], out, "--copy")
    assert r.exit_code == 0, r.output
    files = [p for ps in placed(out).values() for p in ps]
    assert not (folder / ".2.jpg.tmp-4242-0123abcd").exists()
    assert sorted(p.read_bytes() for p in files) == sorted(p.read_bytes() for p in (src / "c").iterdir())
    assert marker(out)["finished"] is True and len(rows_of(out)) == 4


def test_links_interrupted_then_resumed_place_each_photo_once(head_run, tmp_path, monkeypatch):
    src = photos(tmp_path / "src")
    out = tmp_path / "sorted"
    real = os.symlink
    calls = []

    def dies(target, link, *a, **k):
        if "tlearn-probe" not in str(link):  # the photos' links, not the writability probe's
            calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(target, link, *a, **k)

    monkeypatch.setattr(os, "symlink", dies)
    assert sort_cmd(head_run, [src], out).exit_code == 1
    monkeypatch.setattr(os, "symlink", real)
    assert len(every_file(out)) == 4
    r = sort_cmd(head_run, [src], out)
    assert r.exit_code == 0, r.output
    targets = sorted(os.readlink(p) for ps in placed(out).values() for p in ps)
    images = sorted(str(p) for p in src.rglob("*") if p.suffix in (".jpg", ".png") and p.name != "broken.jpg")
    assert targets == images


def _limited(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_file_size_limit_fails_the_sort_and_leaves_no_truncated_copy(head_run, tmp_path):
    """`ulimit -f 100`: it exited 0 ("sorted 0 photos") leaving truncated photos under their own names."""
    src = tmp_path / "src"
    small = [write_image(src / f"s{i}.jpg", i % 2, 40 + i) for i in range(3)]
    big = [write_image(src / f"big{i}.png", i % 2, 50 + i, size=(400, 400)) for i in range(2)]
    assert all(p.stat().st_size > 300_000 for p in big) and all(p.stat().st_size < 20_000 for p in small)
    out = tmp_path / "sorted"
    cmd = [sys.executable, str(REPO / "cli.py"), "predict", str(head_run), str(src), "--sort-into", str(out), "--copy"]
    env = {**os.environ, "TLEARN_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, preexec_fn=_limited(100_000), timeout=300)
    assert r.returncode == 1, r.stderr
    assert "2 photos could not be placed (not placed: File too large)" in r.stderr
    assert r.stderr.count("not sorted ") == 2 and "sorted 3 photos" in r.stdout
    names = every_file(out)
    assert len(names) == 3 and sorted((out / n).read_bytes() for n in names) == sorted(p.read_bytes() for p in small)
    assert marker(out)["finished"] is False
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    files = [p for ps in placed(out).values() for p in ps]
    assert sorted(p.read_bytes() for p in files) == sorted(p.read_bytes() for p in small + big)
    assert marker(out)["finished"] is True and len(rows_of(out)) == 5


def test_an_unwritable_sort_folder_is_refused_before_any_prediction(head_run, tmp_path, monkeypatch):
    import tempfile

    import pipeline.predict as pred

    src = photos(tmp_path / "src")

    def never(*a, **k):
        raise AssertionError("predicted before OUT was checked")

    monkeypatch.setattr(pred, "load_classifier", never)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(tempfile, "mkdtemp", read_only)
        r = sort_cmd(head_run, [src], tmp_path / "ro" / "sorted")
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: --sort-into {tmp_path / 'ro' / 'sorted'} cannot be written (Read-only file "
                                f"system in {tmp_path}); name a folder you can write to")
    assert not (tmp_path / "ro").exists()
    real = os.symlink

    def no_links(target, link, *a, **k):
        raise OSError(errno.EPERM, "Operation not permitted")

    with monkeypatch.context() as m:
        m.setattr(os, "symlink", no_links)
        r = sort_cmd(head_run, [src], tmp_path / "fat")
    assert r.exit_code == 1 and "cannot create symbolic links" in r.output and "add --copy" in r.output
    assert not (tmp_path / "fat").exists() and real is os.symlink
    assert sorted(os.listdir(tmp_path)) == ["src"]  # the probes left nothing


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_refused_before_any_prediction(head_run, tmp_path, monkeypatch):
    import pipeline.predict as pred

    src = photos(tmp_path / "src")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.setattr(pred, "load_classifier", lambda *a: (_ for _ in ()).throw(AssertionError("predicted")))
    try:
        r = sort_cmd(head_run, [src], ro / "sorted")
    finally:
        ro.chmod(0o755)
    assert r.exit_code == 1 and "cannot be written (Permission denied" in r.output


def test_an_earlier_sort_inside_the_inputs_is_named_once(head_run, tmp_path):
    src = photos(tmp_path / "src")
    assert sort_cmd(head_run, [src], src / "sorted").exit_code == 0
    assert all(len(ps) >= 2 for ps in placed(src / "sorted").values())
    r = sort_cmd(head_run, [src], tmp_path / "again")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if "left out" in line]
    assert lines == [f"left out 1 earlier sort inside the inputs, not sorted again: {src / 'sorted'}"]


def test_a_link_and_its_target_each_get_their_row(head_run, tmp_path):
    src = tmp_path / "src"
    target = write_image(src / "target.jpg", 0, 3)
    os.symlink(target, src / "alias.jpg")
    out = tmp_path / "sorted"
    r = sort_cmd(head_run, [src / "alias.jpg", target], out)
    assert r.exit_code == 0, r.output
    assert "1 inputs named a photo already listed (a link and its target" in r.output
    (f,) = [p for ps in placed(out).values() for p in ps]
    assert f.name == "alias.jpg" and os.readlink(f) == str(target)
    rows = rows_of(out)
    assert [row["path"] for row in rows] == [str(src / "alias.jpg"), str(target)]
    assert rows[0]["file"] == rows[1]["file"] == f"{f.parent.name}/alias.jpg"
    assert rows[0]["probability"] == rows[1]["probability"] and not rows[1]["error"]


# ------------------------------------------------------------------ item 7: an empty path


def test_an_empty_path_is_refused_by_every_command(head_run, tmp_path, monkeypatch):
    """'' is the current folder to the OS: `predict RUN ""` classified (and sorted) everything under the cwd."""
    cwd = tmp_path / "cwd"
    write_image(cwd / "ants/a.jpg", 0, 1)
    monkeypatch.chdir(cwd)
    before = tree_digest(cwd)
    run, cache = str(head_run), str(head_run / "features.h5")
    out = str(tmp_path / "o")
    commands = [
        ["predict", run, ""], ["predict", run, str(cwd / "ants/a.jpg"), ""], ["predict", "", "x.jpg"],
        ["predict", run, str(cwd / "ants/a.jpg"), "--sort-into", ""],
        ["extract", "", "--cache", out], ["extract", str(cwd), "--cache", ""],
        ["run", "", "--out", out], ["run", str(cwd), "--out", ""], ["run", str(cwd), "--out", out, "--cache", ""],
        ["train-head", "", "--out", out], ["train-head", cache, "--out", ""],
        ["finetune", "", "--out", out], ["finetune", str(cwd), "--out", ""],
        ["finetune", str(cwd), "--out", out, "--cache", ""],
        ["audit", cache, "--out", ""], ["audit", "", "--out", out], ["audit", cache, "--out", out, "--run", ""],
        ["audit", cache, "--out", out, "--data-dir", ""],
        ["export", run, "--out", ""], ["export", "", "--out", out], ["preview", "", "--out", out],
        ["preview", str(cwd), "--out", ""], ["report", ""], ["info", ""], ["download", ""],
        ["download", out, "--url", ""], ["extract", str(cwd), "--cache", out, "--weights", ""],
        ["extract", str(cwd), "--cache", out, "--backbone", ""], ["finetune", str(cwd), "--out", out, "--weights", ""],
        ["finetune", str(cwd), "--out", out, "--backbone", ""],
    ]
    for args in commands:
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 2, (args, r.output)
        (line,) = r.output.strip().splitlines()
        assert line.startswith("Error: '") and line.endswith("' is empty: an empty path names no file or folder "
                                                             "(an unset shell variable?)"), (args, r.output)
    assert tree_digest(cwd) == before and sorted(os.listdir(tmp_path)) == ["cwd"]


def test_scan_files_never_reads_an_empty_path_as_the_current_folder(tmp_path, monkeypatch):
    from pipeline.data import scan_files

    write_image(tmp_path / "a.jpg", 0, 1)
    monkeypatch.chdir(tmp_path)
    files, skipped = scan_files(["", "a.jpg"])
    assert files == [Path("a.jpg")] and skipped == [("", "empty path (names no file)")]


def test_a_table_that_cannot_be_written_keeps_the_photos_and_the_rerun_finishes(head_run, tmp_path, monkeypatch):
    import pipeline.sorting as sorting

    src = photos(tmp_path / "src")
    out = tmp_path / "sorted"
    real = sorting._write_csv

    def full(path, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sorting, "_write_csv", full)
    r = sort_cmd(head_run, [src / "c"], out)
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == (
        f"Error: cannot write predictions.csv in {out} (No space left on device); the 4 photos placed are kept: "
        "make room and rerun the same command to finish")
    assert len(every_file(out)) == 4 and marker(out)["finished"] is False and not (out / "predictions.csv").exists()
    monkeypatch.setattr(sorting, "_write_csv", real)
    r = sort_cmd(head_run, [src / "c"], out)
    assert r.exit_code == 0, r.output
    assert "4 of these photos were placed by its earlier run" in r.output and len(every_file(out)) == 4
    assert [row["error"] for row in rows_of(out)] == [""] * 4 and marker(out)["finished"] is True


def test_an_unfinished_sort_of_an_earlier_version_is_refused_with_what_to_do(head_run, tmp_path):
    src = photos(tmp_path / "src")
    out = tmp_path / "old"
    out.mkdir()
    (out / MARKER).write_text(json.dumps({"format": "tlearn-sort/1", "run": str(head_run), "copy": False,
                                          "min_confidence": 0.0, "finished": False}))
    r = sort_cmd(head_run, [src / "c"], out)
    assert r.exit_code == 1 and r.output.strip() == (f"Error: --sort-into {out} holds an unfinished sort of an earlier "
                                                     "tlearn, which cannot be finished: sort into a new folder")
    assert os.listdir(out) == [MARKER]


def test_a_name_freed_by_a_failed_photo_is_not_counted_as_its_photo_on_resume(tmp_path, monkeypatch):
    """a/x.jpg fails (too large), b/x.jpg then takes the free name x.jpg: the rerun must still place a/x.jpg."""
    import pipeline.sorting as sorting
    from pipeline.predict import Prediction
    from pipeline.sorting import SortSettings, sort_into

    a, b = write_image(tmp_path / "a/x.jpg", 0, 1), write_image(tmp_path / "b/x.jpg", 0, 2)
    preds = [Prediction(str(p), "ants", 0.9, {"ants": 0.9, "bees": 0.1}, source=str(p)) for p in (a, b)]
    settings, out = SortSettings(str(tmp_path / "run"), copy=True), tmp_path / "out"
    real = sorting._place

    def too_large(src, dest, copy):
        if src == str(a):
            raise OSError(errno.EFBIG, "File too large")
        return real(src, dest, copy)

    monkeypatch.setattr(sorting, "_place", too_large)
    r = sort_into(preds, ["ants", "bees"], out, settings)
    assert r.failed == [(str(a), "not placed: File too large")] and every_file(out) == ["ants/x.jpg"]
    assert (out / "ants/x.jpg").read_bytes() == b.read_bytes()
    monkeypatch.setattr(sorting, "_place", real)
    r = sort_into(preds, ["ants", "bees"], out, settings)
    assert (r.resumed, r.failed, r.placed) == (1, [], {"ants": 2})
    assert (out / "ants/x-2.jpg").read_bytes() == a.read_bytes() and every_file(out) == ["ants/x-2.jpg", "ants/x.jpg"]
    assert [row["file"] for row in rows_of(out)] == ["ants/x-2.jpg", "ants/x.jpg"]
