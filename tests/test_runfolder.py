"""The run folder: one versioned manifest in model.pt, one writer at a time, one run and one kind per folder."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import pipeline.runfolder as rfmod
from cli import cli
from pipeline.runfolder import (FORMAT, FinetuneCheckpoint, ModelFileError, NotARunFolder, RunFolder, RunFolderBusy,
                                RunManifest, load_manifest, load_metrics, save_run)
from tests.conftest import REPO, small_extracted


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def via_torch(obj):
    """What torch.save + torch.load(weights_only=True) give back."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def head_manifest(**kw):
    d = dict(kind="head", class_names=["ants", "bees"],
             state_dict={"weight": torch.arange(6.0).view(2, 3), "bias": torch.tensor([0.5, -0.5])},
             recipe={"lr": 0.001, "epochs": 25}, precision="fp32", transform={"resize": 256}, decoder="pil",
             draft=True, features={"backbone": {"kind": "torchvision", "backbone": "resnet18"}, "feature_dim": 3,
                                   "fingerprint": "abc", "cache": "/x/f.h5"})
    return RunManifest(**{**d, **kw})


# --------------------------------------------------------------------------- the manifest (pure)


def test_manifest_round_trip_both_kinds():
    ft = RunManifest(kind="finetune", class_names=["a", "b", "c"], state_dict={"fc.weight": torch.ones(3, 4)},
                     recipe={"lr": 0.01}, precision="bf16", transform={"resize": 256}, arch="resnet18", head="fc",
                     weights_digest="d1")
    for m in (head_manifest(), ft):
        payload = via_torch(m.to_payload())
        assert payload["format"] == FORMAT == "tlearn-run/2" and payload["kind"] == m.kind
        back = RunManifest.from_payload(payload, "model.pt")
        for f in ("kind", "class_names", "recipe", "precision", "transform", "decoder", "draft", "features", "arch",
                  "head", "weights_digest", "format"):
            assert getattr(back, f) == getattr(m, f), f
        assert all(torch.equal(back.state_dict[k], v) for k, v in m.state_dict.items())
    h = RunManifest.from_payload(via_torch(head_manifest().to_payload()), "model.pt")
    assert h.backbone == {"kind": "torchvision", "backbone": "resnet18"}
    assert h.decoding == {"decoder": "pil", "draft": True}


def test_unversioned_head_model_is_converted():
    """model.pt as train-head wrote it before the manifest had a format."""
    old = {"kind": "head", "state_dict": {"weight": torch.ones(2, 3), "bias": torch.zeros(2)},
           "class_names": ["ants", "bees"], "feature_dim": 3, "recipe": {"lr": 0.001},
           "backbone": {"kind": "torchvision", "backbone": "resnet18", "weights": "none"},
           "cache": {"path": "/d/f.h5", "fingerprint": "fp", "precision": "bf16", "transform": {"resize": 256},
                     "draft": True, "decoder": "torchvision"}}
    m = RunManifest.from_payload(via_torch(old), "model.pt")
    assert (m.kind, m.class_names, m.recipe, m.precision, m.transform) == \
        ("head", ["ants", "bees"], {"lr": 0.001}, "bf16", {"resize": 256})
    assert m.decoding == {"decoder": "torchvision", "draft": True}
    assert m.features == {"backbone": old["backbone"], "feature_dim": 3, "fingerprint": "fp", "cache": "/d/f.h5"}
    assert m.format == FORMAT


def test_unversioned_finetune_model_is_converted():
    old = {"kind": "finetune", "arch": "resnet18", "head": "fc", "class_names": ["a", "b"],
           "state_dict": {"fc.weight": torch.ones(2, 512)}, "recipe": {"lr": 0.001}, "weights_digest": "w",
           "transform": {"resize": 256}, "precision": "fp32"}
    m = RunManifest.from_payload(via_torch(old), "model.pt")
    assert (m.kind, m.arch, m.head, m.weights_digest, m.precision, m.decoding) == \
        ("finetune", "resnet18", "fc", "w", "fp32", {"decoder": "pil", "draft": False})


@pytest.mark.parametrize("payload, message", [
    ({"format": "tlearn-run/9", "kind": "head", "state_dict": {}},
     "model.pt has format 'tlearn-run/9', which this version of tlearn cannot read (it reads tlearn-run/2); "
     "retrain the run with this version"),
    ({"kind": "other", "state_dict": {}}, "model.pt is not a model file of this tool"),
    ([1, 2], "model.pt is not a model file of this tool"),
    ({**head_manifest().to_payload(), "class_names": ["only_one"]},
     "model.pt is not a usable model file: 2 head outputs for 1 class names; retrain the run"),
    ({**head_manifest().to_payload(), "features": None},
     "model.pt is not a usable model file: it does not say which backbone made its features; retrain the run"),
])
def test_foreign_or_broken_manifests_are_refused(payload, message):
    with pytest.raises(ModelFileError) as e:
        RunManifest.from_payload(payload, "model.pt")
    assert str(e.value) == message


def test_checkpoint_round_trip_and_refusals(tmp_path):
    ck = FinetuneCheckpoint(epoch=3, model={"w": torch.ones(2)}, optimizer={"state": {}}, scheduler={"last_epoch": 4},
                            scaler={}, history=[{"epoch": 0}], best_acc=0.5, best_epoch=1, best_state={"w": torch.zeros(2)},
                            best_preds=torch.tensor([0, 1]), seconds=1.5, recipe={"lr": 0.001}, files_digest="fd",
                            rng_torch=torch.random.get_rng_state())
    ck.save(tmp_path / "checkpoint.pt")
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert raw["format"] == "tlearn-checkpoint/1" and raw["epoch"] == 3
    back = FinetuneCheckpoint.load(tmp_path / "checkpoint.pt")
    assert (back.epoch, back.best_acc, back.recipe, back.files_digest) == (3, 0.5, {"lr": 0.001}, "fd")
    del raw["format"]  # a checkpoint of the version before the format field: same keys, still read
    torch.save(raw, tmp_path / "old.pt")
    assert FinetuneCheckpoint.load(tmp_path / "old.pt").epoch == 3
    del raw["best_preds"], raw["rng_torch"]
    torch.save(raw, tmp_path / "partial.pt")
    with pytest.raises(ModelFileError, match=r"partial.pt is not a finetune checkpoint of this tool \(missing "
                                             r"best_preds, rng_torch\); choose another --out"):
        FinetuneCheckpoint.load(tmp_path / "partial.pt")


# --------------------------------------------------------------------------- one run per folder


def test_kill_after_the_commit_point_is_rolled_forward(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_run(out, head_manifest(), {"kind": "head", "v": 1}, "first", lambda d: (d / "curves.png").write_bytes(b"1") and None)
    real, calls = os.replace, []

    def dies_on_second_move(src, dst):
        if str(src).startswith(str(out / rfmod.STAGING) + "/") and "tmp" not in os.path.basename(str(src)):
            calls.append(src)
            if len(calls) == 2:
                raise KeyboardInterrupt  # as if killed between renaming metrics.json and model.pt
        return real(src, dst)

    monkeypatch.setattr(os, "replace", dies_on_second_move)
    new = head_manifest(state_dict={"weight": torch.zeros(2, 3), "bias": torch.zeros(2)})
    with pytest.raises(KeyboardInterrupt):
        save_run(out, new, {"kind": "head", "v": 2}, "second")
    monkeypatch.undo()
    # half applied on disk: the new metrics beside the old model...
    assert json.loads((out / "metrics.json").read_text())["v"] == 2
    assert torch.equal(torch.load(out / "model.pt", weights_only=True)["state_dict"]["weight"], torch.arange(6.0).view(2, 3))
    # ...but every reader (and the next writer) finishes the committed save first
    assert torch.equal(load_manifest(out).state_dict["weight"], torch.zeros(2, 3))
    assert load_metrics(out)["v"] == 2
    assert (out / "report.txt").read_text() == "second"
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt", "report.txt"]  # old picture gone


def test_kill_before_the_commit_point_keeps_the_previous_run(tmp_path):
    out = tmp_path / "run"
    save_run(out, head_manifest(), {"kind": "head", "v": 1}, "first")
    staging = out / rfmod.STAGING  # what a kill while writing the next run leaves
    staging.mkdir()
    (staging / "model.pt").write_bytes(b"half a file")
    assert load_metrics(out)["v"] == 1
    with RunFolder(out, "head"):
        assert not staging.exists()  # dropped: it was never committed
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt", "report.txt"]


def test_second_writer_in_the_same_process_is_refused(tmp_path):
    with RunFolder(tmp_path / "run", "head"):
        with pytest.raises(RunFolderBusy, match="is being written by another run in this process"):
            with RunFolder(tmp_path / "run", "head"):
                pass
    with RunFolder(tmp_path / "run", "head"):  # released
        pass
    assert list((tmp_path / "run").iterdir()) == []  # no lock file left behind


HOLDER = """
import sys, time
from pipeline.runfolder import RunFolder
with RunFolder(sys.argv[1], "head"):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def cache_and_data(tmp_path_factory):
    data, cache = small_extracted(tmp_path_factory.mktemp("rf"))
    return cache, data


def test_second_train_head_into_a_folder_being_written_is_refused(cache_and_data, tmp_path):
    cache, _ = cache_and_data
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots")
        assert r.exit_code == 1
        assert r.output.strip().startswith(f"Error: {out} is being written by another run (pid {holder.pid} on ")
        assert r.output.strip().endswith("wait for it to finish or choose another --out")
        assert not (out / "model.pt").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the lock died with its process: no waiting, no stale-lock refusal
    r = invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.pt", "report.txt"]


@pytest.fixture(scope="module")
def finetune_run(cache_and_data, tmp_path_factory):
    _, data = cache_and_data
    out = tmp_path_factory.mktemp("ftrun") / "ft"
    r = invoke("finetune", data, "--out", out, "--weights", "none", "--workers", 0, "--epochs", 1, "--no-plots")
    assert r.exit_code == 0, r.output
    return out


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_train_head_into_a_finetune_run_is_refused(cache_and_data, finetune_run):
    cache, data = cache_and_data
    before = snapshot(finetune_run)
    for args in (["train-head", cache], ["run", data, "--weights", "none", "--workers", 0]):
        r = invoke(*args, "--out", finetune_run, "--epochs", 1, "--no-plots")
        assert r.exit_code == 1, r.output
        assert r.output.strip() == (f"Error: {finetune_run} holds a finetune run; a head run would mix two kinds of "
                                    "runs in one folder: choose another --out")
    assert snapshot(finetune_run) == before  # run refused before extract wrote features.h5 into it


def test_finetune_into_a_head_run_is_refused(cache_and_data, tmp_path):
    cache, data = cache_and_data
    out = tmp_path / "head"
    assert invoke("train-head", cache, "--out", out, "--epochs", 1).exit_code == 0
    before = snapshot(out)
    r = invoke("finetune", data, "--out", out, "--weights", "none", "--workers", 0, "--epochs", 1)
    assert r.exit_code == 1, r.output
    assert r.output.strip() == (f"Error: {out} holds a train-head run; a finetune run would mix two kinds of runs in "
                                "one folder: choose another --out")
    assert snapshot(out) == before


def test_an_unfinished_finetune_counts_as_a_finetune_run(cache_and_data, finetune_run, tmp_path):
    cache, _ = cache_and_data
    out = tmp_path / "ft"
    out.mkdir()
    shutil.copy(finetune_run / "checkpoint.pt", out / "checkpoint.pt")  # killed before its first commit
    r = invoke("train-head", cache, "--out", out, "--epochs", 1)
    assert r.exit_code == 1 and "holds a finetune run" in r.output
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_users_files_are_never_overwritten_or_deleted(cache_and_data, tmp_path):
    cache, _ = cache_and_data
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.txt").write_text("my own report")
    (out / "notes.md").write_text("notes")
    r = invoke("train-head", cache, "--out", out, "--epochs", 1)
    assert r.exit_code == 1
    assert r.output.strip() == (f"Error: {out} holds report.txt but no run of this tool; a run would overwrite them: "
                                "choose another --out")
    assert snapshot(out) == {"report.txt": b"my own report", "notes.md": b"notes"}
    (out / "report.txt").unlink()
    assert invoke("train-head", cache, "--out", out, "--epochs", 1).exit_code == 0
    assert (out / "notes.md").read_text() == "notes"  # files that are not the run's are left alone
    (out / "metrics.json").write_text("[1, 2]")  # not ours (any more)
    with pytest.raises(NotARunFolder, match="holds a metrics.json that no run of this tool wrote"):
        with RunFolder(out, "head"):
            pass


def test_a_new_run_replaces_the_whole_previous_run(cache_and_data, tmp_path):
    cache, _ = cache_and_data
    out = tmp_path / "run"
    assert invoke("train-head", cache, "--out", out, "--epochs", 2).exit_code == 0
    assert {"curves.png", "confusion.png", "predictions.png"} <= set(os.listdir(out))
    assert invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots").exit_code == 0
    # the first run's pictures would describe another model: they go with it
    assert sorted(os.listdir(out)) == ["metrics.json", "model.pt", "report.txt"]
    assert len(load_metrics(out)["history"]) == 1


def test_head_run_with_an_unversioned_model_file_still_predicts(cache_and_data, tmp_path):
    """A run folder written before model.pt had a format is converted on load and predicts the same."""
    from pipeline.predict import predict

    cache, data = cache_and_data
    out = tmp_path / "run"
    assert invoke("train-head", cache, "--out", out, "--epochs", 2, "--no-plots").exit_code == 0
    files = sorted(str(p) for p in (data / "val").rglob("*.jpg"))
    now = [p.probabilities for p in predict(str(out), files, "cpu")]
    m = torch.load(out / "model.pt", weights_only=True)
    f = m["features"]
    old = {"kind": "head", "state_dict": m["state_dict"], "class_names": m["class_names"],
           "feature_dim": f["feature_dim"], "recipe": m["recipe"], "backbone": f["backbone"],
           "cache": {"path": f["cache"], "fingerprint": f["fingerprint"], "precision": m["precision"],
                     "transform": m["transform"], "draft": m["draft"], "decoder": m["decoder"]}}
    torch.save(old, out / "model.pt")
    assert [p.probabilities for p in predict(str(out), files, "cpu")] == now


def test_temp_files_of_a_killed_writer_are_removed_and_nothing_else(tmp_path):
    """kill -9 during a checkpoint write leaves .checkpoint.pt.tmp-<pid>-<hex> (90 MB for resnet18): the next
    run into the folder (under its lock, so no writer is alive) removes such files, never a user's."""
    from pipeline.runfolder import RunFolder

    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.pt.tmp-4242-0a1b2c3d", out / ".model.pt.tmp-77-deadbeef"]
    kept = [out / "checkpoint.pt.tmp-1-0a1b2c3d", out / ".notes.txt.tmp-1-0a1b2c3d", out / "mine.txt",
            out / ".checkpoint.pt.tmp-4242-0a1b2c3d.bak"]
    for p in stale + kept:
        p.write_bytes(b"x")
    with RunFolder(out, "finetune"):
        pass
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


# --------------------------------------------------------------------------- other commands' --out


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    """A train-head run (synthetic cache, no backbone) and a small image folder beside it."""
    import numpy as np

    from tests.conftest import SMALL, make_dataset
    from tests.synthetic_cache import blobs, write_cache

    root = tmp_path_factory.mktemp("owned")
    X, y = blobs({0: 6, 1: 6}, dim=8)
    paths = [f"{'ab'[c]}/{i}.jpg" for i, c in enumerate(y)]
    tr, va = np.arange(12) % 3 != 0, np.arange(12) % 3 == 0
    cache = write_cache(root / "c.h5", {"train": (X[tr], y[tr], [p for p, t in zip(paths, tr) if t]),
                                        "val": (X[va], y[va], [p for p, v in zip(paths, va) if v])}, ["a", "b"])
    r = invoke("train-head", cache, "--out", root / "run", "--epochs", "1", "--no-plots")
    assert r.exit_code == 0, r.output
    return root, cache, root / "run", make_dataset(root / "data", SMALL)


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args,where", [
    (["audit", "{cache}", "--out", "{run}"], "is the run folder"),
    (["audit", "{cache}", "--out", "{run}/audit"], "lies inside the run folder"),
    (["export", "{run}", "--out", "{run}/model.pt"], "lies inside the run folder"),
    (["export", "{run}", "--out", "{run}/sub/x.pt2"], "lies inside the run folder"),
    (["preview", "{data}", "--out", "{run}/curves.png"], "lies inside the run folder"),
    (["train-head", "{cache}", "--out", "{run}/inner", "--epochs", "1", "--no-plots"], "lies inside the run folder"),
    (["run", "{data}", "--out", "{run}/inner", "--weights", "none", "--workers", "0"], "lies inside the run folder"),
    (["finetune", "{data}", "--out", "{run}/inner", "--weights", "none", "--workers", "0"],
     "lies inside the run folder"),
])
def test_other_commands_never_write_into_a_run_folder(head_run, args, where):
    root, cache, run, data = head_run
    before = _snapshot(run)
    argv = [a.format(cache=cache, run=run, data=data) for a in args]
    r = invoke(*argv)
    out = argv[argv.index("--out") + 1]
    assert r.exit_code == 1, r.output
    assert r.output == (f"Error: --out {out} {where} {run}; a run folder's files belong to its run: "
                        "choose a path outside it\n")
    assert _snapshot(run) == before and not (run / "inner").exists() and not (run / "audit").exists()
    assert invoke("report", run).exit_code == 0 and load_manifest(run).kind == "head"


def test_a_link_into_a_run_folder_is_refused_and_plain_folders_are_not_run_folders(head_run, tmp_path):
    root, cache, run, data = head_run
    (tmp_path / "link").symlink_to(run)
    r = invoke("preview", data, "--out", tmp_path / "link" / "p.png")
    assert r.exit_code == 1 and f"lies inside the run folder {run}" in r.output
    # a folder with files of a run's names that no run of this tool wrote is not mistaken for one
    (tmp_path / "other").mkdir()
    (tmp_path / "other/metrics.json").write_text('{"accuracy": 1}')
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other/model.pt")
    assert not rfmod.is_run_folder(tmp_path / "other") and rfmod.is_run_folder(run)
    r = invoke("preview", data, "--out", tmp_path / "other" / "p.png")
    assert r.exit_code == 0, r.output


def test_audit_never_overwrites_a_report_it_did_not_write(head_run, tmp_path):
    root, cache, run, data = head_run
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/report.txt").write_text("mine")
    r = invoke("audit", cache, "--out", tmp_path / "notes", "--no-plots")
    assert r.exit_code == 1 and "holds report.txt that no audit wrote" in r.output
    assert (tmp_path / "notes/report.txt").read_text() == "mine"
    assert invoke("audit", cache, "--out", tmp_path / "a", "--no-plots").exit_code == 0
    assert invoke("audit", cache, "--out", tmp_path / "a", "--no-plots").exit_code == 0  # its own folder again
