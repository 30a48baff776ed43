import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from pipeline import PipelineError
from pipeline.finetune import finetune
from tests.conftest import finetune_config, make_dataset, write_image

ARTIFACTS = ("model.pt", "metrics.json", "report.txt", "curves.png", "confusion.png", "predictions.png",
             "checkpoint.pt")


ft = finetune_config


def comparable(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.mark.slow
def test_finetune_writes_run_folder(tiny_data, tmp_path):
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(out), "--weights", "none", "--epochs", "2",
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "precision    recall  f1-score   support" in r.output and "trained 2 epochs" in r.output
    for name in ARTIFACTS:
        assert (out / name).stat().st_size > 0, name
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "finetune" and len(m["history"]) == 2 and m["history"][1]["lr"] == 0.001
    assert m["classification_report"]["val"]["macro avg"]["support"] == 4
    assert m["best_val_acc"] == max(h["val_acc"] for h in m["history"])
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["kind"] == "finetune" and model["state_dict"]["fc.weight"].shape == (2, 512)


def test_freeze_backbone_trains_only_the_head(tiny_data, tmp_path):
    from pipeline.finetune import build_classifier

    init, _, _ = build_classifier("resnet18", "none", 0, 2)
    finetune(ft(tiny_data, tmp_path / "frozen", freeze_backbone=True, epochs=1, plots=False))
    sd = torch.load(tmp_path / "frozen/model.pt", weights_only=True)["state_dict"]
    torch.testing.assert_close(sd["conv1.weight"], init.state_dict()["conv1.weight"])
    torch.testing.assert_close(sd["layer4.1.conv2.weight"], init.state_dict()["layer4.1.conv2.weight"])
    assert not torch.equal(sd["fc.weight"], init.state_dict()["fc.weight"])
    # the tutorial's frozen mode runs model.train(): BatchNorm statistics still move
    assert not torch.equal(sd["bn1.running_mean"], init.state_dict()["bn1.running_mean"])


@pytest.mark.slow
def test_checkpoint_needs_resume_and_same_recipe(tiny_data, tmp_path):
    out = tmp_path / "ft"
    finetune(ft(tiny_data, out, epochs=1, plots=False))
    with pytest.raises(PipelineError, match="pass --resume to continue it"):
        finetune(ft(tiny_data, out, epochs=1, plots=False))
    with pytest.raises(PipelineError, match=r"other settings \(lr\)"):
        finetune(ft(tiny_data, out, epochs=1, lr=0.01, resume=True, plots=False))


@pytest.mark.parametrize("splits", ["train", "train,test"])
def test_test_split_never_selects_the_best_epoch(tmp_path, splits):
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "d", {"train": {"ants": 2, "bees": 2}, "test": {"ants": 1, "bees": 1}})
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["finetune", str(data), "--out", str(out), "--weights", "none", "--workers", "0",
                                 "--epochs", "1", "--splits", splits])
    assert r.exit_code == 1, r.output
    expected = {"train": "Error: finetune needs a val split to select the best epoch: pass --splits train,val "
                         "(a test split is only evaluated at the end, never used to select)",
                "train,test": "Error: the test split cannot select the best epoch (that would make its scores "
                              "optimistic): pass --splits train,val; test is evaluated at the end when present"}
    assert r.output.strip() == expected[splits]
    assert not out.exists()


def test_test_split_is_evaluated_but_val_selects(tmp_path):
    from tests.conftest import make_dataset

    data = make_dataset(tmp_path / "d", {"train": {"ants": 2, "bees": 2}, "val": {"ants": 2, "bees": 2},
                                         "test": {"ants": 1, "bees": 2}})
    m = finetune(ft(data, tmp_path / "ft", epochs=1, plots=False))
    assert m["n"] == {"train": 4, "val": 4, "test": 3}
    assert m["classification_report"]["val"]["macro avg"]["support"] == 4
    assert m["classification_report"]["test"]["macro avg"]["support"] == 3
    assert m["best_val_acc"] == m["history"][0]["val_acc"] == m["accuracy"]["val"]


def test_a_damaged_checkpoint_is_one_line_on_resume(tiny_data, tmp_path):
    out = tmp_path / "ft"
    finetune(ft(tiny_data, out, epochs=1, plots=False))
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    ck["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(3)  # crafted: fits no parameter
    torch.save(ck, out / "checkpoint.pt")
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(out), "--weights", "none", "--workers", "0",
                                 "--epochs", "1", "--no-plots", "--resume"])
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(f"Error: {out / 'checkpoint.pt'} cannot be resumed: it does not fit this model")


@pytest.mark.slow
def test_dropout_draws_are_seeded_too(tiny_data, tmp_path):
    """An architecture with dropout (mobilenet_v3_small) gives the same weights for the same --seed."""
    sds = []
    for k in range(2):
        finetune(ft(tiny_data, tmp_path / f"ft{k}", epochs=1, plots=False, backbone="mobilenet_v3_small", lr=0.05))
        sds.append(torch.load(tmp_path / f"ft{k}" / "model.pt", weights_only=True)["state_dict"])
    assert sds[0].keys() == sds[1].keys() and all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_every_accepted_seed_works(tiny_data, tmp_path):
    """--seed takes 0..2**63-1 (the recipe's bound): the largest trains (the per-image augmentation seed used
    to overflow torch's range after the decode pass); one more is a usage error before any work."""
    from pipeline.data import LabelledImages, image_seed, train_transform
    from pipeline.recipe import MAX_SEED

    top = str(MAX_SEED)
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(tmp_path / "ft"), "--weights", "none",
                                 "--epochs", "1", "--workers", "0", "--no-plots", "--seed", top])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ft/metrics.json").read_text())["recipe"]["seed"] == MAX_SEED
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(tmp_path / "ft2"), "--seed", str(MAX_SEED + 1)])
    assert r.exit_code == 2 and "Invalid value for '--seed'" in r.output and not (tmp_path / "ft2").exists()
    # the augmentation seed: unchanged where torch took it before, in range everywhere
    assert image_seed(5, 3, 7) == (5 * 1_000_003 + 3) * 10_000_019 + 7
    assert 0 <= image_seed(MAX_SEED, 24, 10**6) < 2**64
    f = sorted(str(p) for p in (tiny_data / "train/ants").iterdir())[0]
    x, y = LabelledImages([f], [0], train_transform(), seed=MAX_SEED)[(24, 0)]
    assert x.shape == (3, 224, 224) and y == 0


@pytest.mark.parametrize("args", [["preview", "--out", "p.png"], ["audit", "--out", "a"], ["extract", "--cache", "c.h5"]])
def test_seed_options_refuse_what_they_cannot_use_before_any_work(tiny_data, tmp_path, args):
    """preview and audit --seed: 0..2**63-1 (usage error); extract: 0..2**32-1 (its views' seeds), one line."""
    cmd, flag, name = args
    target = str(tmp_path / "c.h5") if cmd == "audit" else str(tiny_data)
    for seed in ("-1", str(2**64)):
        r = CliRunner().invoke(cli, [cmd, target, flag, str(tmp_path / name), "--seed", seed])
        assert r.exit_code == (1 if cmd == "extract" else 2), r.output
        said = "--seed must be from 0 to 4294967295" if cmd == "extract" else "Invalid value for '--seed'"
        assert said in r.output and "Traceback" not in r.output
        assert not (tmp_path / name).exists()
    if cmd == "preview":
        r = CliRunner().invoke(cli, [cmd, target, flag, str(tmp_path / name), "--seed", str(2**63 - 1), "-n", "2"])
        assert r.exit_code == 0 and (tmp_path / name).is_file(), r.output


def test_resume_refuses_files_changed_in_place(tiny_data, tmp_path):
    """Same paths and labels, other content: the epochs so far learned from the old pictures, so resuming is
    refused with the files named (it used to continue without a word)."""
    import os

    from tests.conftest import write_image

    out = tmp_path / "ft"
    finetune(ft(tiny_data, out, epochs=1, plots=False))
    changed = tiny_data / "train/bees/img_001.jpg"
    st = changed.stat()
    write_image(changed, 0, 999)  # other pixels under the same name
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(PipelineError) as e:
        finetune(ft(tiny_data, out, epochs=1, plots=False, resume=True))
    assert str(e.value) == (f"cannot resume {out}: 1 file of {tiny_data} changed since the checkpoint (same path, "
                            "other size or modification time): train/bees/img_001.jpg; put it back, or start again "
                            "in another --out")


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
    assert r.exit_code == 1 and "decoded differently from finetune (decoder pil, --jpeg-decode draft)" in r.output
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


def test_finetune_writes_its_report_and_pictures(tiny_data, tmp_path):
    out = tmp_path / "ft"
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(out), "--weights", "none", "--epochs", "1",
                                 "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "precision    recall  f1-score   support" in r.output
    for name in ("report.txt", "curves.png", "confusion.png", "predictions.png"):
        assert (out / name).stat().st_size > 0, name
