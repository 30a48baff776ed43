"""model.pt's fields checked against each other and the backbone when predict or export loads a run, and
export built from the same recorded preprocessing spec as predict."""
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import cli
from pipeline.predict import predict
from tests.conftest import SMALL, head_run_folder


@pytest.fixture(scope="module")
def head_run(tmp_path_factory):
    return head_run_folder(tmp_path_factory.mktemp("spec"), SMALL, "--recipe", "tutorial", "--epochs", "2")


def tampered(run, tmp_path, change):
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    m = torch.load(bad / "model.pt", weights_only=True)
    change(m)
    torch.save(m, bad / "model.pt")
    return bad


def _set(path, value):
    def change(m):
        d = m
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return change


def _both(*changes):
    def change(m):
        for c in changes:
            c(m)
    return change


TAMPERS = {
    "head of another width": (_set(["state_dict", "weight"], torch.zeros(2, 300)),
                              "the head takes 300 features, its record of the features says 512"),
    "head and record of another width": (_both(_set(["state_dict", "weight"], torch.zeros(2, 300)),
                                               _set(["features", "feature_dim"], 300)),
                                         "the head takes 300 features, its backbone gives 512"),
    "seed 1.5": (_set(["features", "backbone", "seed"], 1.5), "its backbone seed 1.5 is not an integer"),
    "seed text": (_set(["features", "backbone", "seed"], "abc"), "its backbone seed 'abc' is not an integer"),
    "mean text": (_set(["transform", "spec", "mean"], ["x", 0.4, 0.4]),
                  "its preprocessing spec is not usable (could not convert string to float: 'x')"),
    "mean NaN": (_set(["transform", "spec", "mean"], [float("nan"), 0.4, 0.4]),
                 "its preprocessing mean or std is not a finite number"),
    "crop True": (_set(["transform", "spec", "crop"], True), "its preprocessing resize and crop are not integers"),
    "precision": (_set(["precision"], "fp64"), "its precision 'fp64' is not one of fp32, bf16, fp16"),
    "class twice": (_set(["class_names"], ["ants", "ants"]), "class_names names a class twice"),
    "decoder": (_set(["decoder"], "torchvision"),  # a default run drafts its JPEGs (fast)
                "its decoder 'torchvision' and draft True disagree with its preprocessing spec (pil, draft True)"),
    "backbone kind": (_set(["features", "backbone", "kind"], "onnx"), "its backbone kind 'onnx' is unknown"),
    "no digest": (_set(["features", "backbone", "weights_digest"], None), "its backbone record lacks weights_digest"),
}


@pytest.mark.parametrize("case", list(TAMPERS))
def test_a_tampered_model_file_is_one_line_in_predict_and_export(case, head_run, tmp_path):
    data, run = head_run
    change, problem = TAMPERS[case]
    bad = tampered(run, tmp_path, change)
    for args in (["predict", str(bad), str(data / "val")], ["export", str(bad), "--out", str(tmp_path / "m.pt2")]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1, (args, r.output)
        assert r.output.strip() == f"Error: {bad / 'model.pt'} is not a usable model file: {problem}; retrain the run"
    assert not (tmp_path / "m.pt2").exists()


def test_export_normalises_with_the_recorded_spec_as_predict_does(head_run, tmp_path):
    """A run recorded with another mean and std: export used the ImageNet constants whatever the spec said."""
    from torchvision import transforms as T

    data, run = head_run
    other = tampered(run, tmp_path, _both(_set(["transform", "spec", "mean"], [0.3, 0.5, 0.7]),
                                          _set(["transform", "spec", "std"], [0.1, 0.2, 0.4])))
    r = CliRunner().invoke(cli, ["export", str(other), "--out", str(tmp_path / "m.pt2")])
    assert r.exit_code == 0, r.output
    files = sorted(str(p) for p in (data / "val").rglob("*.jpg"))
    expected = np.array([[p.probabilities["ants"], p.probabilities["bees"]] for p in predict(str(other), files, "cpu")])
    before = np.array([[p.probabilities["ants"], p.probabilities["bees"]] for p in predict(str(run), files, "cpu")])
    assert np.abs(expected - before).max() > 1e-3  # the spec matters to predict
    extra = {"preprocess.json": "", "class_names.json": ""}
    prog = torch.export.load(str(tmp_path / "m.pt2"), extra_files=extra).module()
    x = torch.stack([T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])(Image.open(f).convert("RGB"))
                     for f in files])
    np.testing.assert_allclose(prog(x).detach().numpy(), expected, atol=1e-5)
    spec = json.loads(extra["preprocess.json"])
    assert spec["mean"] == [0.3, 0.5, 0.7] and spec["std"] == [0.1, 0.2, 0.4] and spec["crop"] == 224
    assert json.loads(extra["class_names.json"]) == ["ants", "bees"]
