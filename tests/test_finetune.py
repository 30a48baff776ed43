import json

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from pipeline import PipelineError
from pipeline.finetune import finetune
from tests.conftest import finetune_config

ARTIFACTS = ("model.pt", "metrics.json", "report.txt", "curves.png", "confusion.png", "predictions.png",
             "checkpoint.pt")


ft = finetune_config


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


def test_dropout_draws_are_seeded_too(tiny_data, tmp_path):
    """An architecture with dropout (mobilenet_v3_small) gives the same weights for the same --seed."""
    sds = []
    for k in range(2):
        finetune(ft(tiny_data, tmp_path / f"ft{k}", epochs=1, plots=False, backbone="mobilenet_v3_small", lr=0.05))
        sds.append(torch.load(tmp_path / f"ft{k}" / "model.pt", weights_only=True)["state_dict"])
    assert sds[0].keys() == sds[1].keys() and all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])
