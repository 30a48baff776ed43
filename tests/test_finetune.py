import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import cli
from pipeline import PipelineError
from pipeline.finetune import FinetuneConfig, finetune
from pipeline.predict import predict

ARTIFACTS = ("model.pt", "metrics.json", "report.txt", "curves.png", "confusion.png", "predictions.png",
             "checkpoint.pt")


def ft(data, out, **kw):
    kw.setdefault("weights", "none")
    kw.setdefault("workers", 0)
    kw.setdefault("epochs", 2)
    return FinetuneConfig(data_dir=str(data), out=str(out), **kw)


def comparable(history):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


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


def test_checkpoint_needs_resume_and_same_recipe(tiny_data, tmp_path):
    out = tmp_path / "ft"
    finetune(ft(tiny_data, out, epochs=1, plots=False))
    with pytest.raises(PipelineError, match="pass --resume to continue it"):
        finetune(ft(tiny_data, out, epochs=1, plots=False))
    with pytest.raises(PipelineError, match=r"other settings \(lr\)"):
        finetune(ft(tiny_data, out, epochs=1, lr=0.01, resume=True, plots=False))


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    from tests.conftest import make_dataset

    root = tmp_path_factory.mktemp("hr")
    data = make_dataset(root / "data", {"train": {"ants": 3, "bees": 3}, "val": {"ants": 2, "bees": 2}})
    out = root / "run"
    r = CliRunner().invoke(cli, ["run", str(data), "--out", str(out), "--weights", "none", "--workers", "0",
                                 "--epochs", "3", "--no-plots"], env={"TLEARN_OFFLINE": "1"})
    assert r.exit_code == 0, r.output
    return data, out


def test_predict_head_run_table_json_and_bad_files(head_run, tmp_path):
    data, out = head_run
    (tmp_path / "broken.jpg").write_bytes(b"<html>not an image</html>")
    (tmp_path / "notes.txt").write_text("x")
    args = ["predict", str(out), str(data / "val/ants/img_000.jpg"), str(tmp_path)]
    r = CliRunner().invoke(cli, args + ["--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [os.path.basename(p["path"]) for p in rows] == ["img_000.jpg", "broken.jpg", "notes.txt"]
    assert rows[0]["class"] in ("ants", "bees") and abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5
    assert rows[0]["probability"] == max(rows[0]["probabilities"].values())
    assert rows[1]["error"].startswith("not a readable image") and "not an image extension" in rows[2]["error"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "ERROR: not a readable image" in r.output and "probability" in r.output.splitlines()[0]


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
