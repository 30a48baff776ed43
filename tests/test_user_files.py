"""Files the tool writes: export, preview and audit replace only their own earlier output; run and audit folders
replace or remove only the files their last run (or audit) wrote; audit and train-head never write one folder at
once; a failed audit picture costs nothing else; names from the disk are escaped wherever they are printed."""
import errno
import json
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import pipeline.audit as auditmod
import pipeline.runfolder as rfmod
from cli import cli
from pipeline.runfolder import FolderChanged, RunManifest, save_run
from tests.conftest import REPO, make_dataset
from tests.synthetic_cache import blobs, write_cache


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def synthetic(root, class_names=("a", "b"), n=8, dim=8):
    """A cache of Gaussian blobs (no images, no backbone): train-head and audit run on it in a second."""
    counts = {c: n for c in range(len(class_names))}
    X, y = blobs(counts, dim=dim)
    val = np.arange(len(y)) % 4 == 0
    paths = [f"c{c}/{i}.jpg" for i, c in enumerate(y)]
    pick = lambda m: (X[m], y[m], [p for p, k in zip(paths, m) if k])  # noqa: E731
    return write_cache(root / "c.h5", {"train": pick(~val), "val": pick(val)}, list(class_names))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return synthetic(tmp_path_factory.mktemp("uf"))


# --------------------------------------------------------------------------- 1. export, preview, audit --out


@pytest.fixture(scope="module")
def exportable_run(small_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "run"
    r = invoke("train-head", small_cache, "--out", out, "--recipe", "tutorial", "--epochs", 1, "--no-plots")
    assert r.exit_code == 0, r.output
    return out


def test_export_never_overwrites_a_users_file(exportable_run, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    r = invoke("export", exportable_run, "--out", notes)
    assert r.exit_code == 1
    assert r.output == (f"Error: --out {notes} exists and is not a program exported by this tool; it would be "
                        "overwritten: name another path, or remove the file first\n")
    assert notes.read_text() == "my notes"
    (tmp_path / "link.pt2").symlink_to(notes)
    r = invoke("export", exportable_run, "--out", tmp_path / "link.pt2")
    assert r.exit_code == 1 and "is a symbolic link; writing would replace the link" in r.output
    assert (tmp_path / "link.pt2").is_symlink() and notes.read_text() == "my notes"


def test_an_exported_program_is_recognised_and_nothing_else(tmp_path):
    class Twice(torch.nn.Module):
        def forward(self, x):
            return x * 2

    prog = torch.export.export(Twice(), (torch.rand(2, 3),))
    torch.export.save(prog, tmp_path / "ours.pt2", extra_files={"class_names.json": json.dumps(["ants", "bees"])})
    torch.export.save(prog, tmp_path / "theirs.pt2")  # a program of another tool
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt2")
    (tmp_path / "text.pt2").write_text("hello")
    assert rfmod.is_exported_program(tmp_path / "ours.pt2")
    assert not any(rfmod.is_exported_program(tmp_path / n) for n in ("theirs.pt2", "weights.pt2", "text.pt2"))


def test_preview_replaces_its_own_grid_and_never_a_users_picture(tiny_data, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8), (200, 10, 10)).save(photo)
    fig = plt.figure()
    fig.savefig(tmp_path / "chart.png")  # a user's matplotlib picture: no preview mark
    plt.close(fig)
    for theirs in (photo, tmp_path / "chart.png"):
        before = theirs.read_bytes()
        r = invoke("preview", tiny_data, "--out", theirs, "-n", 2)
        assert r.exit_code == 1
        assert r.output == (f"Error: --out {theirs} exists and is not a preview grid of this tool; it would be "
                            "overwritten: name another path, or remove the file first\n")
        assert theirs.read_bytes() == before
    for name in ("p.png", "p.jpg", "p.svg", "p.pdf"):  # the tool's own grid: a rerun replaces it
        for count in (2, 3):
            r = invoke("preview", tiny_data, "--out", tmp_path / name, "-n", count)
            assert r.exit_code == 0, (name, r.output)
            assert r.output == f"wrote {tmp_path / name} ({count} images)\n"


@pytest.mark.parametrize("name,content", [("report.txt", b"my own report"), ("audit.json", b'{"mine": 1}'),
                                          ("duplicates.png", b"\x89PNG mine"), ("suspects.png", b"\x89PNG mine"),
                                          ("image_issues.png", b"\x89PNG mine")])
def test_audit_never_overwrites_a_users_file(cache, tmp_path, name, content):
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_bytes(content)
    (out / "notes.md").write_text("notes")
    not_a_cache = tmp_path / "x.h5"
    not_a_cache.write_text("not a cache")  # refused before any work: the cache is not even read
    for c in (not_a_cache, cache):
        r = invoke("audit", c, "--out", out)
        assert r.exit_code == 1
        assert r.output == (f"Error: --out {out} holds {name} that no audit wrote (or changed since an audit wrote "
                            "it); an audit would overwrite it: move it away or choose another --out\n")
    assert snapshot(out) == {name: content, "notes.md": b"notes"}


def test_audit_replaces_only_what_it_wrote(cache, tmp_path):
    out = tmp_path / "a"
    assert invoke("audit", cache, "--out", out).exit_code == 0
    j = json.loads((out / "audit.json").read_text())
    assert j["format"] == "tlearn-audit/1"
    assert sorted(j["files"]) == ["duplicates.png", "image_issues.png", "label_issues.csv", "report.txt", "suspects.png"]
    assert j["files"]["report.txt"]["size"] == (out / "report.txt").stat().st_size
    (out / "notes.md").write_text("notes")
    r = invoke("audit", cache, "--out", out, "--no-plots")  # its own folder again: the pictures go with the audit
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["audit.json", "label_issues.csv", "notes.md", "report.txt"]
    with open(out / "report.txt", "a") as f:
        f.write("my remark\n")  # the user's words now
    r = invoke("audit", cache, "--out", out)
    assert r.exit_code == 1 and "holds report.txt that no audit wrote (or changed since" in r.output
    assert (out / "report.txt").read_text().endswith("my remark\n")


def test_an_audit_folder_of_an_earlier_version_is_its_own(cache, tmp_path):
    out = tmp_path / "old"
    assert invoke("audit", cache, "--out", out).exit_code == 0
    j = json.loads((out / "audit.json").read_text())
    del j["format"], j["files"]  # as audits wrote it before they recorded their files
    (out / "audit.json").write_text(json.dumps(j))
    r = invoke("audit", cache, "--out", out, "--no-plots")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(out)) == ["audit.json", "label_issues.csv", "report.txt"]  # its pictures replaced (removed) too


# --------------------------------------------------------------------------- 2. audit and train-head at once


def test_a_run_committed_while_an_audit_worked_is_never_overwritten(cache, tmp_path, monkeypatch):
    out = tmp_path / "both"
    real = auditmod.out_of_fold_issues

    def a_run_meanwhile(*a, **k):  # train-head into the same --out while the audit computes
        assert invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots").exit_code == 0
        return real(*a, **k)

    monkeypatch.setattr(auditmod, "out_of_fold_issues", a_run_meanwhile)
    r = invoke("audit", cache, "--out", out, "--no-plots")
    assert r.exit_code == 1
    assert r.output == (f"Error: --out {out} is the run folder {out}; a run folder's files belong to its run: "
                        "choose a path outside it\n")
    assert (out / "report.txt").read_text().startswith("backbone synthetic")  # the run's report, whole
    assert sorted(os.listdir(out)) == ["metrics.json", "model.pt", "report.txt"]


def test_a_users_file_that_appears_while_an_audit_works_is_never_overwritten(cache, tmp_path, monkeypatch):
    out = tmp_path / "a"
    real = auditmod.out_of_fold_issues

    def a_file_meanwhile(*a, **k):
        out.mkdir()
        (out / "suspects.png").write_bytes(b"mine")
        return real(*a, **k)

    monkeypatch.setattr(auditmod, "out_of_fold_issues", a_file_meanwhile)
    r = invoke("audit", cache, "--out", out)
    assert r.exit_code == 1 and f"--out {out} holds suspects.png that no audit wrote" in r.output
    assert snapshot(out) == {"suspects.png": b"mine"}


AUDIT_HOLDER = """
import sys, time
from pathlib import Path
from pipeline.runfolder import AUDIT_LABEL, take_lock
with take_lock(Path(sys.argv[1]), AUDIT_LABEL):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_train_head_into_a_folder_an_audit_writes_is_refused(cache, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", AUDIT_HOLDER, str(out)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots")
        assert r.exit_code == 1
        assert r.output.startswith(f"Error: {out} is being written by an audit (pid {holder.pid} on ")
        r = invoke("audit", cache, "--out", out, "--no-plots")  # nor a second audit (its lock is not a run's)
        assert r.exit_code == 1
        assert r.output.startswith(f"Error: {out} is being written by an audit (pid {holder.pid} on ")
        assert not rfmod.is_run_folder(out)
        assert sorted(os.listdir(out)) == [rfmod.LOCK]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert not rfmod.is_run_folder(out)  # a killed audit's lock file does not make a run folder
    assert invoke("audit", cache, "--out", out, "--no-plots").exit_code == 0


def head_manifest():
    return RunManifest(kind="head", class_names=["a", "b"],
                       state_dict={"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, recipe={},
                       features={"backbone": {"kind": "synthetic"}, "feature_dim": 3})


def test_a_run_commit_never_replaces_a_file_it_did_not_stage(tmp_path):
    out = tmp_path / "run"

    def another_program_writes(staging):  # between the run's start and its commit
        (out / "report.txt").write_text("written by an audit of an earlier version")
        return None

    with pytest.raises(FolderChanged, match="report.txt in .* appeared or changed while this command worked"):
        save_run(out, head_manifest(), {"kind": "head"}, "the run's report", another_program_writes)
    assert snapshot(out) == {"report.txt": b"written by an audit of an earlier version"}
    (out / "report.txt").unlink()
    save_run(out, head_manifest(), {"kind": "head", "v": 1}, "first")

    def edits_the_runs_report(staging):
        (out / "report.txt").write_text("my edit")

    with pytest.raises(FolderChanged):
        save_run(out, head_manifest(), {"kind": "head", "v": 2}, "second", edits_the_runs_report)
    assert (out / "report.txt").read_text() == "my edit" and json.loads((out / "metrics.json").read_text())["v"] == 1


# --------------------------------------------------------------------------- 3. a user's file in a run folder


def test_a_users_file_of_a_pictures_name_in_a_run_folder_is_kept(cache, tmp_path):
    out = tmp_path / "u2"
    assert invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots").exit_code == 0
    files = json.loads((out / "metrics.json").read_text())["files"]
    assert sorted(files) == ["model.pt", "report.txt"] and files["report.txt"]["size"] > 0
    (out / "learning_curve.png").write_bytes(b"my own curve")
    model = (out / "model.pt").read_bytes()
    for flags in ([], ["--learning-curve"]):  # whether or not the run would write that name
        r = invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots", *flags)
        assert r.exit_code == 1
        assert r.output == (f"Error: {out} holds learning_curve.png, which its run did not write (added or changed "
                            "since); a run would replace or remove them: move them away or choose another --out\n")
    assert (out / "learning_curve.png").read_bytes() == b"my own curve" and (out / "model.pt").read_bytes() == model
    (out / "learning_curve.png").unlink()
    with open(out / "report.txt", "a") as f:
        f.write("my remark\n")
    r = invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots")
    assert r.exit_code == 1 and "holds report.txt, which its run did not write" in r.output
    assert (out / "report.txt").read_text().endswith("my remark\n")


def test_a_users_file_beside_an_unfinished_finetune_is_kept(tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"a finetune killed before its first commit")
    (out / "curves.png").write_bytes(b"mine")
    with pytest.raises(rfmod.NotARunFolder, match="holds curves.png, which its run did not write"):
        with rfmod.RunFolder(out, "finetune"):
            pass
    assert (out / "curves.png").read_bytes() == b"mine"


def test_a_run_of_an_earlier_version_is_replaced_as_before(cache, tmp_path):
    out = tmp_path / "old"
    assert invoke("train-head", cache, "--out", out, "--epochs", 1).exit_code == 0
    m = json.loads((out / "metrics.json").read_text())
    del m["files"]  # as runs wrote it before they recorded their files
    (out / "metrics.json").write_text(json.dumps(m))
    assert invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots").exit_code == 0
    assert sorted(os.listdir(out)) == ["metrics.json", "model.pt", "report.txt"]


# --------------------------------------------------------------------------- 9. a failed audit picture


def test_a_picture_that_cannot_be_written_costs_nothing_else(cache, tmp_path, monkeypatch):
    import matplotlib.figure

    real = matplotlib.figure.Figure.savefig

    def disk_full_for(names):
        def savefig(self, fname, *a, **k):
            if any(n in str(fname) for n in names):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(self, fname, *a, **k)
        return savefig

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full_for(["duplicates"]))
    r = invoke("audit", cache, "--out", tmp_path / "one")
    assert r.exit_code == 0, r.output
    j = json.loads((tmp_path / "one/audit.json").read_text())
    assert j["pictures"] == ["suspects.png", "image_issues.png"]
    assert "duplicates.png not drawn: OSError: [Errno 28] No space left on device" in j["notes"]
    assert "duplicates.png not drawn: OSError" in (tmp_path / "one/report.txt").read_text()
    assert sorted(os.listdir(tmp_path / "one")) == ["audit.json", "image_issues.png", "label_issues.csv", "report.txt", "suspects.png"]
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", disk_full_for([".png"]))
    r = invoke("audit", cache, "--out", tmp_path / "none")
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path / "none")) == ["audit.json", "label_issues.csv", "report.txt"]
    assert json.loads((tmp_path / "none/audit.json").read_text())["pictures"] == []


def test_the_audit_draws_each_of_its_pictures():
    from pipeline.audit_plots import DRAW

    assert tuple(DRAW) == auditmod.PICTURES


# --------------------------------------------------------------------------- 11. report of a damaged report.txt


def test_report_of_a_report_that_is_not_utf8_is_one_line(cache, tmp_path):
    out = tmp_path / "run"
    assert invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots").exit_code == 0
    (out / "report.txt").write_bytes(b"accuracy \xff\xfe 0.9\n")
    r = invoke("report", out)
    assert r.exit_code == 1
    assert r.output == (f"Error: {out / 'report.txt'} is not UTF-8 text (byte 9), so no run of this tool wrote it as "
                        "it is now; metrics.json holds the run's figures, or train the run again\n")


# --------------------------------------------------------------------------- 12. control codes in class names

HOSTILE = ["ants\x1b[2J", "bees\x07", "wasps\nFORGED LINE"]


def assert_clean(text):
    assert "\x1b" not in text and "\x07" not in text
    assert not any(line.startswith("FORGED") for line in text.splitlines())


def test_class_names_with_control_codes_are_escaped_in_reports(tmp_path):
    cache = synthetic(tmp_path, HOSTILE, n=6)
    out = tmp_path / "run"
    r = invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots")
    assert r.exit_code == 0, r.output
    assert_clean(r.output)
    assert "ants\\x1b[2J" in r.output and "wasps\\nFORGED LINE" in r.output
    assert_clean((out / "report.txt").read_text())
    r = invoke("report", out)
    assert r.exit_code == 0 and "bees\\x07" in r.output
    assert_clean(r.output)
    (out / "report.txt").write_text("raw \x1b[2J report\n")  # a report written raw (an earlier version, an edit)
    assert invoke("report", out).output == "raw \\x1b[2J report\n"
    r = invoke("audit", cache, "--out", tmp_path / "a", "--no-plots", "--label-threshold", 0)
    assert r.exit_code == 0, r.output
    assert_clean(r.output)
    assert_clean((tmp_path / "a/report.txt").read_text())


def test_class_folders_with_control_codes_are_escaped_in_run_output(tmp_path):
    data = make_dataset(tmp_path / "data", {"train": {"a\x1b[2J": 3, "b\nFORGED": 3},
                                            "val": {"a\x1b[2J": 2, "b\nFORGED": 2}})
    r = CliRunner().invoke(cli, ["run", str(data), "--out", str(tmp_path / "run"), "--weights", "none", "--workers",
                                 "0", "--no-plots", "--epochs", "1"], env={"TLEARN_OFFLINE": "1"})
    assert r.exit_code == 0, r.output
    assert_clean(r.output)
    assert "a\\x1b[2J" in r.output


# --------------------------------------------------------------------------- 13. audit's counts and zeros


def test_photo_checks_count_photos_and_never_print_negative_zero():
    from pipeline.image_stats import FIELDS

    ordinary = dict(width=100, height=80, bright_p05=0.2, bright_p50=0.5, bright_p95=0.8, clipped=0, blur=0.5,
                    entropy=7.0, colour=0.2)
    rows_stats = [dict(ordinary, bright_p95=0.1, entropy=-0.0),  # dark and a single flat colour (entropy -0.0)
                  dict(ordinary, bright_p95=0.2), ordinary, ordinary]  # dark only; two ordinary photos
    stats = np.array([[r[f] for f in FIELDS] for r in rows_stats], np.float32)
    rows = auditmod.Rows(np.zeros((4, 2), np.float32), np.zeros(4, np.int64), [f"p{i}.jpg" for i in range(4)],
                         ["train"] * 4, ["a"])
    found, info = auditmod.image_issue_list(rows, stats, 200, [])
    assert [(r["path"], r["kind"]) for r in found] == [("p0.jpg", "dark"), ("p1.jpg", "dark"),
                                                       ("p0.jpg", "low_information")]
    assert info["photos"] == 2 and info["measured"] == 4
    score = next(r["score"] for r in found if r["kind"] == "low_information")
    assert score == 0.0 and math.copysign(1, score) == 1
    a = auditmod.Audit(cache="c.h5", data_dir=None, rows={"train": 4}, thresholds={
        "dup_threshold": None, "dup_ratio": 0.45, "label_threshold": 0.5, "outlier_z": 5.0, "knn": 5, "top": 20},
        image_issues=found, image_checks=info,
        label_issues=[{"path": "q.jpg", "split": "train", "label": "a", "suggested": "b", "score": auditmod.nonneg(
            1 - 1.0000001, 6), "source": "out-of-fold"}])
    text = auditmod.report_text(a)
    assert "photos not worth training on: 2 of 4 photos measured (dark 2, low_information 1; a photo may be of " \
           "several kinds)" in text
    assert "-0.0000" not in text and "  0.0000  q.jpg" in text
