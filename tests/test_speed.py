"""Start-up and the time around the loops (issue 11), pictures that scale (issue 10 item 14) and find
their images from anywhere (item 11): what each speed-up must keep exact."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import cli
from pipeline import PipelineError, plots, sidecar
from pipeline.evaluate import evaluate_predictions
from tests.conftest import REPO, make_dataset, small_extracted, write_image

HEAVY = ("torch", "torchvision", "numpy", "h5py", "sklearn", "matplotlib", "scipy")
COMMANDS = ("extract", "train-head", "run", "finetune", "predict", "export", "report", "info", "download", "preview")


def _modules_after(code: str, cwd=REPO) -> set[str]:
    """Top-level modules loaded by a fresh interpreter that runs code (then prints sys.modules)."""
    prog = code + "\nimport sys, json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    r = subprocess.run([sys.executable, "-c", prog], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    return set(json.loads(r.stdout.strip().splitlines()[-1]))


def test_every_command_help_imports_nothing_heavy():
    code = ("from click.testing import CliRunner\nfrom cli import cli\n"
            f"for c in {COMMANDS!r} + ('',):\n"
            "    r = CliRunner().invoke(cli, [c, '--help'] if c else ['--help'])\n"
            "    assert r.exit_code == 0 and 'Usage' in r.output, (c, r.output)\n")
    assert not _modules_after(code) & set(HEAVY)


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    return small_extracted(tmp_path_factory.mktemp("speed"), "feats.h5")[1]


def test_train_head_process_never_imports_torchvision_sklearn_or_matplotlib(small_cache, tmp_path):
    """The report and pictures come from the sidecar; the main process loads torch and h5py only."""
    out = tmp_path / "run"
    code = ("import sys\nfrom click.testing import CliRunner\nfrom cli import cli\n"
            "from pipeline.sidecar import Sidecar\n"
            "start = Sidecar.start.__func__\n"
            "def early(cls, *a, **k):\n"
            "    assert 'torch' not in sys.modules and 'h5py' not in sys.modules  # started before them\n"
            "    return start(cls, *a, **k)\n"
            "Sidecar.start = classmethod(early)\n"
            f"r = CliRunner().invoke(cli, ['train-head', {str(small_cache)!r}, '--out', {str(out)!r}, '--epochs', '2'])\n"
            "assert r.exit_code == 0, r.output\n"
            "assert 'precision    recall  f1-score   support' in r.output, r.output\n")
    loaded = _modules_after(code)
    assert {"torch", "h5py"} <= loaded and not loaded & {"torchvision", "sklearn", "matplotlib", "scipy"}
    for name in ("model.pt", "metrics.json", "report.txt", "curves.png", "confusion.png", "predictions.png"):
        assert (out / name).stat().st_size > 0, name


def _preds(n=40, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n).tolist()
    p = [v if rng.random() < 0.7 else int(rng.integers(0, classes)) for v in y]
    return y, p


def test_sidecar_report_is_exactly_the_in_process_one():
    names = ["ants", "bees", "wasps"]
    splits = {"val": _preds(), "test": _preds(seed=1)}
    with sidecar.sidecar(plots=False) as side:
        assert side is not None
        remote = sidecar.evaluate_splits(side, splits, names)
    here = {s: evaluate_predictions(y, p, names) for s, (y, p) in splits.items()}
    assert remote == here
    assert remote["val"]["report_text"] == here["val"]["report_text"]


def test_a_dead_sidecar_costs_nothing_but_the_pictures(tmp_path):
    names = ["a", "b", "c"]
    splits = {"val": _preds()}
    side = sidecar.Sidecar.start(plots=False)
    side.kill()
    assert sidecar.evaluate_splits(side, splits, names) == {"val": evaluate_predictions(*splits["val"], names)}
    job = plots.PictureJob(str(tmp_path), [], [[1]], ["a"], "val", [], [], [])
    notes = sidecar.start_pictures(side, job)()
    assert len(notes) == 1 and notes[0].startswith("pictures not drawn:")
    side.close()


def test_many_classes_give_a_bounded_confusion_picture(tmp_path):
    """Issue 10 item 14: 300 classes made a ~36,000 px figure; now at most 1600 px, the 25 classes with
    the most errors, and the picture says so."""
    classes = [f"class_{i:03d}" for i in range(300)]
    y = list(range(300)) * 2
    p = list(y)
    for k in range(0, 60, 2):  # 30 errors: class k predicted as k + 1
        p[k] = k + 1
    m = np.zeros((300, 300), np.int64)
    np.add.at(m, (y, p), 1)
    sub, names, note = plots.matrix_view(m.tolist(), classes)
    assert sub.shape == (25, 25) and note == "25 of 300 classes: those with the most errors"
    assert names == sorted(names) and "class_000" in names and "class_299" not in names
    assert sub.sum() >= 25  # the errors among the shown classes are kept
    job = plots.PictureJob(str(tmp_path), [{"epoch": 0, "train_loss": 1.0, "val_loss": 1.0, "train_acc": 0.5,
                                            "val_acc": 0.5}], m.tolist(), classes, "val",
                           [str(tmp_path / "gone.jpg")] * 600, y, p)
    assert plots.draw_pictures(job) == []
    with Image.open(tmp_path / "confusion.png") as im:
        assert max(im.size) <= 1600
    assert plots.matrix_view([[1, 2], [3, 4]], ["a", "b"])[2] == ""


def test_a_failing_picture_never_fails_a_finished_run(small_cache, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(sidecar.Sidecar, "start", classmethod(lambda cls, *a, **k: None))  # draw in-process
    monkeypatch.setattr(plots, "confusion_png", boom)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["train-head", str(small_cache), "--out", str(out), "--epochs", "2"])
    assert r.exit_code == 0, r.output
    assert "confusion.png not drawn: MemoryError: std::bad_alloc" in r.output
    assert (out / "model.pt").is_file() and (out / "curves.png").is_file() and (out / "predictions.png").is_file()
    assert not (out / "confusion.png").exists()


def test_data_folder_of_a_relative_cache_resolves_from_anywhere(tmp_path, monkeypatch):
    """Issue 10 item 11: a cache that recorded DATA_DIR as typed ('data') still finds its images when
    train-head runs elsewhere: next to the cache file, or under the current folder."""
    work = tmp_path / "work"
    img = write_image(work / "data" / "val" / "ants" / "a.jpg", 0, 0)
    monkeypatch.chdir(tmp_path)
    assert plots.resolve_data_dir("data", work / "feats.h5", "val/ants/a.jpg") == work / "data"
    monkeypatch.chdir(work)
    assert plots.resolve_data_dir("data", tmp_path / "elsewhere" / "feats.h5", "val/ants/a.jpg") == work / "data"
    assert plots.resolve_data_dir(str(work / "data"), "x.h5") == work / "data"
    assert isinstance(plots.thumbnail(img), np.ndarray)
    assert plots.thumbnail(work / "nope.jpg") == plots.MISSING
    (work / "bad.jpg").write_bytes(b"not an image")
    assert plots.thumbnail(work / "bad.jpg").startswith("cannot read image")
    assert plots.inside(work, "../etc/passwd") is None and plots.inside(work, "/etc/passwd") is None
    assert plots.inside(work, "val/ants/a.jpg") == work / "val/ants/a.jpg"


def test_train_head_from_another_folder_finds_the_images(tmp_path, monkeypatch):
    from cache import read_cache
    from pipeline.train_head import picture_paths

    make_dataset(tmp_path / "data", {"train": {"ants": 2, "bees": 2}, "val": {"ants": 1, "bees": 1}})
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["extract", "data", "--cache", "feats.h5", "--weights", "none", "--workers", "0"])
    assert r.exit_code == 0, r.output
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    paths = picture_paths(read_cache(tmp_path / "feats.h5"), "val")
    assert len(paths) == 2 and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)


def _count_decodes(monkeypatch) -> list[list[str]]:
    """finetune's decode pass, recorded: one list of files per call."""
    from pipeline import finetune as ft

    decoded, real = [], ft.find_unreadable

    def counting(files, workers=0):
        decoded.append(list(files))
        return real(files, workers)

    monkeypatch.setattr(ft, "find_unreadable", counting)
    return decoded


def test_verdicts_skip_the_decode_pass_for_unchanged_files(tiny_data, tmp_path, monkeypatch):
    """finetune's usable-file check decodes each file once per content: a rerun into the same folder
    (or --resume) reuses the verdicts; a changed file is decoded again."""
    from pipeline import finetune as ft
    from pipeline.data import scan_dataset

    bad = tiny_data / "train" / "ants" / "img_000.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    decoded = _count_decodes(monkeypatch)
    verdicts = tmp_path / "run" / ft.VERDICTS
    data = scan_dataset(tiny_data, ["train", "val"])
    first = ft.usable_files(data, 0, None, verdicts=verdicts)
    assert len(decoded[0]) == 10 and verdicts.is_file()
    assert first[1] == [("train/ants/img_000.jpg", first[1][0][1])] and "truncated" in first[1][0][1]
    again = ft.usable_files(data, 0, None, verdicts=verdicts)
    assert decoded[1] == [] and again == first
    write_image(bad, 0, 99)  # repaired
    repaired = ft.usable_files(data, 0, None, verdicts=verdicts)
    assert decoded[2] == [str(bad)] and repaired[1] == [] and len(repaired[0]["train"][0]) == 6
    assert repaired == ft.usable_files(data, 0, None)  # the same answer as a full decode pass


def test_one_set_of_workers_serves_every_split_with_the_same_batches(tiny_data, monkeypatch):
    import torch

    from pipeline import finetune as ft
    from pipeline.data import EpochSampler, LabelledImages, eval_transform, scan_dataset, train_transform
    from pipeline.runtime import resolve_runtime

    data = scan_dataset(tiny_data, ["train", "val"])
    files, _ = ft.usable_files(data, 0, None)
    rt = resolve_runtime("cpu")
    groups = [(files["train"][0], files["train"][1], train_transform(), True),
              (files["val"][0], files["val"][1], eval_transform(), False)]

    def reference(g, epoch):  # what one DataLoader per split gave before
        f, y, tf, shuffle = groups[g]
        sampler = EpochSampler(len(f), 3, shuffle)
        sampler.set_epoch(epoch)
        return list(torch.utils.data.DataLoader(LabelledImages(f, y, tf, 3), batch_size=4, sampler=sampler))

    shared = ft.SharedLoader(groups, 3, 4, 0, rt)
    for epoch in (0, 1):
        parts = shared.pass_(epoch, [0, 1])
        for g, part in enumerate(parts):
            got, want = list(part), reference(g, epoch)
            assert len(got) == len(want) == len(part)
            for (x, y), (x2, y2) in zip(got, want):
                assert torch.equal(x, x2) and torch.equal(y, y2)

    monkeypatch.setattr(LabelledImages, "__getitem__", lambda self, key: (torch.zeros(1), os.getpid()))
    shared = ft.SharedLoader(groups, 3, 4, 2, rt)
    pids = set()
    for epoch in (0, 1):
        for part in shared.pass_(epoch, [0, 1]):
            pids |= {int(p) for _, y in part for p in y}
    assert len(pids) == 2 and os.getpid() not in pids  # two workers for both splits and both epochs
    shared.close()  # ends them now, not at the interpreter's exit
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_bad_head_device_is_one_line_and_run_checks_it_before_extracting(small_cache, tiny_data, tmp_path):
    r = CliRunner().invoke(cli, ["train-head", str(small_cache), "--out", str(tmp_path / "h"), "--device", "tpu"])
    assert r.exit_code == 1 and "Error: unknown device 'tpu': use auto, cpu or cuda" in r.output
    r = CliRunner().invoke(cli, ["run", str(tiny_data), "--out", str(tmp_path / "r"), "--weights", "none",
                                 "--head-device", "tpu"])
    assert r.exit_code == 1 and "unknown device 'tpu'" in r.output and not (tmp_path / "r" / "features.h5").exists()


def test_the_sidecar_side_never_imports_torch():
    """What the sidecar loads (report, pictures) must not pay for torch: it runs beside torch's import."""
    loaded = _modules_after("from pipeline import evaluate, plots, sidecar\nevaluate.preload()\nplots.preload()")
    # the report is numpy now (scikit-learn's C x C arrays cost minutes at 10,000 classes): only matplotlib
    assert "matplotlib" in loaded and "torch" not in loaded and "torchvision" not in loaded


def test_a_small_head_trains_on_one_thread_with_the_same_result(small_cache, tmp_path):
    import torch

    from pipeline.head import expand_grid, train_heads
    from pipeline.head import cpu_threads
    from pipeline.train_head import HeadConfig, run_train_head
    from cache import read_cache

    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    m = run_train_head(HeadConfig(cache=str(small_cache), out=str(tmp_path / "h"), epochs=(3,), plots=False))
    assert torch.get_num_threads() == before
    c = read_cache(small_cache)
    tr, va = c.splits["train"], c.splits["val"]
    (ref,), _ = train_heads((tr.features, tr.labels), (va.features, va.labels), 2, expand_grid({"epochs": [3]}))
    assert m["history"] == ref.history and m["best_epoch"] == ref.best_epoch


@pytest.mark.slow
def test_extract_and_predict_never_import_torchvision_or_dynamo_and_finetune_not_torchvision(tiny_data, tmp_path):
    """torchvision pulls torch._dynamo in (seconds); so does any use of torch.optim. The default backbone and
    its transforms do without both; finetune steps torch.optim (dynamo then, but still no torchvision)."""
    code = ("from click.testing import CliRunner\nfrom cli import cli\n"
            f"r = CliRunner().invoke(cli, ['run', {str(tiny_data)!r}, '--out', {str(tmp_path / 'r')!r}, "
            "'--weights', 'none', '--workers', '0', '--epochs', '2', '--no-plots'])\n"
            "assert r.exit_code == 0, r.output\n"
            f"r = CliRunner().invoke(cli, ['predict', {str(tmp_path / 'r')!r}, {str(tiny_data / 'val')!r}])\n"
            "assert r.exit_code == 0 and 'probability' in r.output, r.output\n"
            "import sys\nassert 'torch._dynamo' not in sys.modules\n"
            f"r = CliRunner().invoke(cli, ['finetune', {str(tiny_data)!r}, '--out', {str(tmp_path / 'f')!r}, "
            "'--weights', 'none', '--workers', '0', '--epochs', '1', '--no-plots'])\n"
            "assert r.exit_code == 0, r.output\n")
    loaded = _modules_after(code)
    assert "torch" in loaded and "torchvision" not in loaded


def _cli_process(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_the_quick_exit_loses_no_output_and_keeps_the_exit_code(small_cache, tmp_path):
    """After a command the process ends without torch's teardown; what it printed and wrote is all there,
    and a failing command still exits 1 with its one line."""
    out = tmp_path / "run"
    r = _cli_process("train-head", small_cache, "--out", out, "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip().endswith(f"run folder {out}") and "precision    recall" in r.stdout
    r = _cli_process("predict", out, small_cache.parent / "data" / "val", "--json")
    assert r.returncode == 0 and len(json.loads(r.stdout)) == 4, r.stderr
    clean = _cli_process("predict", out, small_cache.parent / "data" / "val", "--json", env={"TLEARN_CLEAN_EXIT": "1"})
    assert clean.stdout == r.stdout
    bad = _cli_process("predict", tmp_path / "nowhere", small_cache)
    assert bad.returncode == 2 and "does not exist" in bad.stderr  # click's usage error, before any torch
    bad = _cli_process("predict", small_cache.parent, small_cache)
    assert bad.returncode == 1 and bad.stderr.startswith("Error: ") and len(bad.stderr.strip().splitlines()) == 1


def test_the_quick_exit_waits_for_anything_still_running(monkeypatch):
    import threading

    import cli as cli_module

    monkeypatch.delenv("TLEARN_CLEAN_EXIT", raising=False)
    assert cli_module._nothing_left_running()  # torch is loaded in this process, nothing else runs
    monkeypatch.setenv("TLEARN_CLEAN_EXIT", "1")
    assert not cli_module._nothing_left_running()
    monkeypatch.delenv("TLEARN_CLEAN_EXIT")
    release = threading.Event()
    t = threading.Thread(target=release.wait)  # e.g. a checkpoint still being written
    t.start()
    try:
        assert not cli_module._nothing_left_running()
    finally:
        release.set()
        t.join()
    import h5py

    with h5py.File(Path(os.environ["TORCH_HOME"]) / "open.h5", "w"):
        assert not cli_module._nothing_left_running()
    assert cli_module._nothing_left_running()


def test_a_cache_of_the_same_folder_vouches_for_its_files(tiny_data, tmp_path, monkeypatch):
    """finetune --cache: files an extract decoded and used, unchanged since, skip the decode pass; files it
    skipped are decoded again (a failure may have been passing), as is a changed file; a cache of another
    folder, or decoded differently (--draft), is refused with one line."""
    from pipeline import finetune as ft
    from pipeline.data import scan_dataset

    bad = tiny_data / "train" / "ants" / "img_000.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated: the cache records it as skipped
    cache = tmp_path / "feats.h5"
    r = CliRunner().invoke(cli, ["extract", str(tiny_data), "--cache", str(cache), "--weights", "none",
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output
    decoded = _count_decodes(monkeypatch)
    data = scan_dataset(tiny_data, ["train", "val"])
    vouched = ft.usable_files(data, 0, None, verdicts=tmp_path / "run" / ft.VERDICTS,
                              from_cache=ft.cache_verdicts(cache, data.root))
    assert decoded == [[str(bad)]] and vouched == ft.usable_files(data, 0, None)  # the same answer as decoding
    assert [p for p, _ in vouched[1]] == ["train/ants/img_000.jpg"] and "truncated" in vouched[1][0][1]
    assert (tmp_path / "run" / ft.VERDICTS).is_file()  # kept for the next run into that folder
    good = tiny_data / "val" / "bees" / sorted(p.name for p in (tiny_data / "val" / "bees").iterdir())[0]
    os.utime(good, ns=(good.stat().st_atime_ns, good.stat().st_mtime_ns + 10**9))  # touched since
    decoded.clear()
    ft.usable_files(data, 0, None, from_cache=ft.cache_verdicts(cache, data.root))
    assert decoded == [[str(bad), str(good)]]

    other = make_dataset(tmp_path / "other", {"train": {"ants": 1, "bees": 1}, "val": {"ants": 1, "bees": 1}})
    r = CliRunner().invoke(cli, ["finetune", str(other), "--out", str(tmp_path / "ft"), "--cache", str(cache),
                                 "--weights", "none", "--workers", "0", "--epochs", "1"])
    assert r.exit_code == 1 and r.output.startswith(f"Error: cache {cache} was extracted from ")
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "ft" / "model.pt").exists()
    drafted = tmp_path / "draft.h5"
    r = CliRunner().invoke(cli, ["extract", str(tiny_data), "--cache", str(drafted), "--weights", "none",
                                 "--workers", "0", "--draft"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(tmp_path / "ft2"), "--cache", str(drafted),
                                 "--weights", "none", "--workers", "0", "--epochs", "1"])
    assert r.exit_code == 1 and "decoded differently from finetune (decoder pil, --draft)" in r.output
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(tmp_path / "ft3"), "--cache", str(cache),
                                 "--weights", "none", "--workers", "0", "--epochs", "1", "--no-plots"])
    assert r.exit_code == 0, r.output
    assert "skipped train/ants/img_000.jpg: truncated" in r.output


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_file_that_breaks_after_the_check_stops_finetune_with_one_line(tiny_data, tmp_path, monkeypatch, workers):
    """A file truncated between the decode check and its batch (or vouched for wrongly): one line naming it,
    never a DataLoader worker's traceback, and no model.pt."""
    from pipeline import finetune as ft

    bad = tiny_data / "train" / "ants" / "img_000.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    monkeypatch.setattr(ft, "find_unreadable", lambda files, workers=0: [""] * len(files))  # "all decoded"
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(out), "--weights", "none",
                                 "--workers", workers, "--epochs", "1", "--no-plots"])
    assert r.exit_code == 1
    assert r.output == (f"Error: {bad} passed the decode check but cannot be read now (truncated image file "
                        "(Truncated File Read)); fix or remove it and run again\n")
    assert not (out / "model.pt").exists()


def test_a_cache_names_its_folder_absolutely_whatever_the_cwd(tiny_data, tmp_path, monkeypatch):
    """A cache extracted with a relative DATA_DIR vouches for that folder from any cwd, and never for a
    copy of it elsewhere that has the same relative name."""
    import shutil

    from pipeline import finetune as ft

    (tmp_path / "a").mkdir()
    shutil.copytree(tiny_data, tmp_path / "a" / "D")
    shutil.copytree(tiny_data, tmp_path / "b" / "D", copy_function=shutil.copy2)  # same names, sizes, mtimes
    monkeypatch.chdir(tmp_path / "a")
    r = CliRunner().invoke(cli, ["extract", "D", "--cache", "../c.h5", "--weights", "none", "--workers", "0"])
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(tmp_path)
    assert len(ft.cache_verdicts("c.h5", Path("a/D"))) == 10
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(PipelineError, match=r"was extracted from .*/a/D, not from .*/b/D; drop --cache"):
        ft.cache_verdicts("../c.h5", Path("D"))
