"""predict, export and preview: a run folder's model rebuilt from model.pt alone, used on image files."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import cli
from pipeline.finetune import FinetuneConfig, finetune
from tests.conftest import finetune_config
from pipeline.predict import predict


ft = finetune_config


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    from tests.conftest import SMALL, head_run_folder

    return head_run_folder(tmp_path_factory.mktemp("hr"), SMALL, "--epochs", "3")


def test_predict_head_run_table_json_and_bad_files(head_run, tmp_path):
    data, out = head_run
    (tmp_path / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (tmp_path / "notes.txt").write_text("x")
    args = ["predict", str(out), str(data / "val/ants/img_000.jpg"), str(tmp_path)]
    r = CliRunner().invoke(cli, args + ["--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [os.path.basename(p["path"]) for p in rows] == ["img_000.jpg", "broken.jpg", "notes.txt"]
    assert rows[0]["class"] in ("ants", "bees") and abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5
    assert rows[0]["probability"] == max(rows[0]["probabilities"].values())
    assert rows[1]["error"].startswith("not a readable image") and "not an image extension" in rows[2]["error"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "ERROR: not a readable image" in r.output and "probability" in r.stdout.splitlines()[0]


def test_predict_matches_cached_features(head_run):
    """A head run's prediction rebuilds the backbone: its logits equal head(cached features)."""
    from cache import read_cache

    data, out = head_run
    c = read_cache(out / "features.h5")
    m = torch.load(out / "model.pt", weights_only=True)
    probs = torch.softmax(torch.tensor(c.splits["val"].features) @ m["state_dict"]["weight"].T
                          + m["state_dict"]["bias"], 1)
    preds = predict(str(out), [str(data / p) for p in c.splits["val"].paths], device="cpu")
    got = torch.tensor([[p.probabilities["ants"], p.probabilities["bees"]] for p in preds])
    torch.testing.assert_close(got, probs, atol=1e-5, rtol=1e-4)


def test_predict_refuses_missing_backbone_weights(tiny_data, tmp_path, resnet18_state_file):
    import shutil

    w = tmp_path / "w.pt"
    shutil.copy(resnet18_state_file, w)
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(tiny_data), "--out", str(out), "--weights", str(w), "--workers", "0",
                                 "--epochs", "1", "--no-plots"])
    assert r.exit_code == 0, r.output
    w.unlink()
    r = CliRunner().invoke(cli, ["predict", str(out), str(tiny_data / "val")])
    assert r.exit_code == 1
    assert "trained on features of resnet18 with weights" in r.output and "does not exist" in r.output


@pytest.mark.parametrize("kind", ["head", "finetune"])
def test_export_gives_predict_probabilities(kind, head_run, tmp_path):
    from torchvision import transforms as T

    data, out = head_run
    if kind == "finetune":
        out = tmp_path / "ft"
        finetune(ft(data, out, epochs=1, plots=False))
    r = CliRunner().invoke(cli, ["export", str(out), "--out", str(tmp_path / "m.pt2")])
    assert r.exit_code == 0, r.output
    files = sorted(str(p) for p in (data / "val").rglob("*.jpg"))
    expected = np.array([[p.probabilities["ants"], p.probabilities["bees"]] for p in predict(str(out), files, "cpu")])
    prog = torch.export.load(str(tmp_path / "m.pt2")).module()
    crop = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    x = torch.stack([crop(Image.open(f).convert("RGB")) for f in files])
    np.testing.assert_allclose(prog(x).detach().numpy(), expected, atol=1e-5)


def test_preview_grid(tiny_data, tmp_path):
    r = CliRunner().invoke(cli, ["preview", str(tiny_data), "--out", str(tmp_path / "p.png"), "-n", "4"])
    assert r.exit_code == 0 and "(4 images)" in r.output
    assert Image.open(tmp_path / "p.png").size[0] > 400


def test_head_run_on_a_program_backbone_predicts_and_exports(tiny_data, tmp_path):
    from tests.test_extract import TinyNet

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    prog = torch.export.export(TinyNet().eval(), (torch.randn(2, 3, 224, 224),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(prog, str(tmp_path / "tiny.pt2"))
    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(tiny_data), "--out", str(out), "--backbone", str(tmp_path / "tiny.pt2"),
                                 "--workers", "0", "--epochs", "2", "--no-plots"])
    assert r.exit_code == 0, r.output
    files = sorted(str(p) for p in (tiny_data / "val").rglob("*.jpg"))
    preds = predict(str(out), files, "cpu")
    assert all(p.error is None for p in preds)
    r = CliRunner().invoke(cli, ["export", str(out), "--out", str(tmp_path / "m.pt2")])
    assert r.exit_code == 0, r.output
    from torchvision import transforms as T

    crop = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    x = torch.stack([crop(Image.open(f).convert("RGB")) for f in files])
    got = torch.export.load(str(tmp_path / "m.pt2")).module()(x).detach().numpy()
    np.testing.assert_allclose(got, [[p.probabilities["ants"], p.probabilities["bees"]] for p in preds], atol=1e-5)
    (tmp_path / "tiny.pt2").write_bytes(b"changed")
    r = CliRunner().invoke(cli, ["predict", str(out), files[0]])
    assert r.exit_code == 1 and "which is missing or changed" in r.output


def test_predict_decodes_like_the_cache_it_was_trained_on(tiny_data, tmp_path):
    """A run on a --decoder torchvision cache predicts through the same decoder: logits = head(features)."""
    from cache import read_cache

    out = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(tiny_data), "--out", str(out), "--weights", "none", "--workers", "0",
                                 "--epochs", "2", "--no-plots", "--decoder", "torchvision"])
    assert r.exit_code == 0, r.output
    c = read_cache(out / "features.h5")
    m = torch.load(out / "model.pt", weights_only=True)
    assert m["decoder"] == "torchvision"
    expected = torch.softmax(torch.tensor(c.splits["val"].features) @ m["state_dict"]["weight"].T
                             + m["state_dict"]["bias"], 1)
    preds = predict(str(out), [str(tiny_data / p) for p in c.splits["val"].paths], device="cpu", batch_size=3)
    got = torch.tensor([[p.probabilities["ants"], p.probabilities["bees"]] for p in preds])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)



def test_predict_lists_every_input_in_the_order_given(head_run, tmp_path):
    data, out = head_run
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a_broken.jpg").write_bytes(b"<html>")
    (folder / "b_good.jpg").write_bytes((data / "val/bees/img_000.jpg").read_bytes())
    (folder / "c_notes.txt").write_text("x")
    inputs = [str(tmp_path / "missing.jpg"), str(data / "val/ants/img_001.jpg"), str(folder),
              str(data / "val/ants/img_000.jpg")]
    r = CliRunner().invoke(cli, ["predict", str(out), *inputs, "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["path"] for row in rows] == [inputs[0], inputs[1], str(folder / "a_broken.jpg"),
                                             str(folder / "b_good.jpg"), str(folder / "c_notes.txt"), inputs[3]]
    assert [("error" in row) for row in rows] == [True, False, True, False, True, False]
    assert rows[0]["error"] == "no such file"


def test_predict_reports_progress(head_run):
    from pipeline.progress import Progress

    class Recorder(Progress):
        def __init__(self):
            self.calls = []

        def start(self, total, label):
            self.calls.append(("start", total, label))

        def update(self, n):
            self.calls.append(("update", n))

        def close(self):
            self.calls.append(("close",))

    data, out = head_run
    rec = Recorder()
    files = sorted(str(p) for p in (data / "val").rglob("*.jpg"))
    preds = predict(str(out), files + ["nope.jpg"], "cpu", batch_size=3, progress=rec)
    assert len(preds) == 5
    assert rec.calls == [("start", 4, "predict"), ("update", 3), ("update", 1), ("close",)]


def test_names_are_printed_escaped(head_run, tmp_path):
    from pipeline.predict import Prediction, format_table

    data, out = head_run
    evil = tmp_path / "evil\x1b[31mred\nname.jpg"
    evil.write_bytes((data / "val/ants/img_000.jpg").read_bytes())
    r = CliRunner().invoke(cli, ["predict", str(out), str(evil), str(tmp_path / "gone\x07.jpg")])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output and len(r.stdout.splitlines()) == 3
    lines = r.stdout.splitlines()
    assert "evil\\x1b[31mred\\nname.jpg " in lines[1]
    assert "gone\\x07.jpg " in lines[2] and lines[2].endswith("  ERROR: no such file")
    r = CliRunner().invoke(cli, ["predict", str(out), str(evil), "--json"])
    assert json.loads(r.stdout)[0]["path"] == str(evil)  # JSON escapes by itself and keeps the real name
    table = format_table([Prediction("p.jpg", "b\x1b[2Jees", 0.75, {}), Prediction("évian 蜂.jpg", "ants", 0.5, {})])
    assert "b\\x1b[2Jees" in table and "\x1b" not in table and "évian 蜂.jpg" in table


def test_ctrl_c_in_finetune_names_the_command_that_resumes(tiny_data, tmp_path, monkeypatch):
    import pipeline.finetune as ftmod

    seen = []

    def interrupted(cfg, progress=None):  # after a finished epoch: its checkpoint is there
        seen.append(cfg)
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "checkpoint.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(ftmod, "finetune", interrupted)
    out = tmp_path / "my run"
    args = ["finetune", str(tiny_data), "--out", str(out), "--weights", "none", "--epochs", "3", "--lr", "0.01",
            "--splits", "train,val", "--no-plots", "--workers", "0"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1
    expected = (f"cli finetune {tiny_data} --out '{out}' --epochs 3 --lr 0.01 --weights none --workers 0 "
                "--no-plots --resume")
    assert r.output.strip() == f"Error: interrupted; the last finished epoch is kept: resume with {expected}"
    # the command it names is the same run with --resume
    import shlex

    r = CliRunner().invoke(cli, shlex.split(expected)[1:])
    assert seen[1] == FinetuneConfig(**{**seen[0].__dict__, "resume": True})


def test_export_is_atomic_and_a_write_failure_is_one_line(head_run, tmp_path, monkeypatch):
    data, out = head_run
    target = tmp_path / "m.pt2"
    assert CliRunner().invoke(cli, ["export", str(out), "--out", str(target)]).exit_code == 0  # an earlier export
    previous = target.read_bytes()
    real = torch.export.save

    def disk_full(prog, f, **kw):
        real(prog, f, **kw)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file: No space left")

    monkeypatch.setattr(torch.export, "save", disk_full)
    r = CliRunner().invoke(cli, ["export", str(out), "--out", str(target)])
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: cannot write {target}: RuntimeError: [enforce fail") and \
        len(r.output.strip().splitlines()) == 1
    assert target.read_bytes() == previous and sorted(os.listdir(tmp_path)) == ["m.pt2"]


def test_predict_of_folders_without_images_is_an_error(head_run, tmp_path):
    """An empty folder used to print a table header and exit 0, as if it had classified something."""
    _, out = head_run
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty2").mkdir()
    for extra in ([], ["--json"]):
        r = CliRunner().invoke(cli, ["predict", str(out), str(tmp_path / "empty"), str(tmp_path / "empty2"), *extra])
        assert r.exit_code == 1, r.output
        assert r.output.strip() == (f"Error: no images found in {tmp_path / 'empty'}, {tmp_path / 'empty2'} (looked "
                                    "for .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp, .heic, .heif, .hif, "
                                    ".avif); name image files or folders that hold some")
