"""export --out F.onnx: a real ONNX model (onnxruntime runs it) that gives the .pt2 program's probabilities
and novelty at any batch size; its metadata carries the class names and the threshold; suffixes and
users' files are refused."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cli import cli
from tests.conftest import head_run_folder, real_data_dir

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install -e '.[test]')")
onnx = pytest.importorskip("onnx", reason="onnx is not installed (pip install -e '.[onnx]')")
pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install -e '.[onnx]')")


@pytest.fixture(scope="module")
def novelty_run(tmp_path_factory):
    """A head run with a novelty model (12 train photos), random-init backbone."""
    layout = {"train": {"ants": 6, "bees": 6}, "val": {"ants": 2, "bees": 2}}
    return head_run_folder(tmp_path_factory.mktemp("onnx"), layout, "--epochs", "2")


@pytest.fixture(scope="module")
def exported(novelty_run, tmp_path_factory):
    _, run = novelty_run
    out = tmp_path_factory.mktemp("exp")
    for name in ("m.pt2", "m.onnx"):
        r = CliRunner().invoke(cli, ["export", str(run), "--out", str(out / name)])
        assert r.exit_code == 0, r.output
    return out / "m.pt2", out / "m.onnx"


def _photos(data, n: int) -> torch.Tensor:
    """n photos as the export takes them: Resize 256 + CenterCrop 224, [0, 1]; real ants and bees when the
    dataset is there (else the run's own synthetic photos)."""
    from torchvision import transforms as T

    real = real_data_dir()
    files = sorted((real / "val" if real else data / "val").rglob("*.jpg"))[:n]
    files = (files * n)[:n]
    crop = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    return torch.stack([crop(Image.open(f).convert("RGB")) for f in files])


@pytest.mark.parametrize("batch", [1, 3, 5])  # the export traced a batch of 2
def test_onnx_gives_the_pt2_probabilities_and_novelty(novelty_run, exported, batch):
    data, _ = novelty_run
    pt2, path = exported
    x = _photos(data, batch)
    with torch.no_grad():
        want_p, want_n = torch.export.load(str(pt2)).module()(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["probabilities", "novelty"]
    probs, novelty = session.run(None, {"images": x.numpy()})
    assert probs.shape == (batch, 2) and novelty.shape == (batch,)
    np.testing.assert_allclose(probs, want_p.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(novelty, want_n.numpy(), atol=1e-3, rtol=1e-4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_onnx_metadata_and_opset(novelty_run, exported):
    from pipeline.onnx_export import OPSET

    _, run = novelty_run
    model = onnx.load(str(exported[1]))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    threshold = torch.load(run / "model.pt", weights_only=False)["novelty"]["threshold"]
    assert json.loads(meta["class_names"]) == ["ants", "bees"]
    assert json.loads(meta["novelty_threshold"]) == pytest.approx(threshold)
    assert json.loads(meta["preprocess"])["crop"] == 224 and meta["tlearn.export"] == "1"
    assert {o.domain: o.version for o in model.opset_import}[""] == OPSET


def test_onnx_export_of_a_finetune_run_has_one_output(tmp_path, tiny_data):
    from pipeline.finetune import finetune
    from tests.conftest import finetune_config

    run = tmp_path / "ft"
    finetune(finetune_config(tiny_data, run, epochs=1, plots=False))
    out = tmp_path / "ft.onnx"
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    x = _photos(tiny_data, 3)
    want = torch.export.load(_pt2(run, tmp_path)).module()(x).detach().numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], want, atol=1e-4, rtol=0)


def _pt2(run, tmp_path) -> str:
    out = tmp_path / "ft.pt2"
    assert CliRunner().invoke(cli, ["export", str(run), "--out", str(out)]).exit_code == 0
    return str(out)


def test_onnx_export_overwrites_its_own_file_never_a_users(novelty_run, exported, tmp_path):
    _, run = novelty_run
    own = tmp_path / "again.onnx"
    own.write_bytes(exported[1].read_bytes())
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(own)])
    assert r.exit_code == 0, r.output
    old = tmp_path / "old.onnx"  # what export wrote under .onnx before: a torch.export zip
    old.write_bytes(exported[0].read_bytes())
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(old)])
    assert r.exit_code == 0, r.output
    assert json.loads({p.key: p.value for p in onnx.load(str(old)).metadata_props}["class_names"]) == ["ants", "bees"]
    user = tmp_path / "users.onnx"
    user.write_bytes(b"my own model")
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(user)])
    assert r.exit_code == 1 and "is not an ONNX model exported by this tool" in r.output
    assert user.read_bytes() == b"my own model" and "Traceback" not in r.output


def test_other_suffixes_are_a_usage_error(novelty_run, tmp_path):
    _, run = novelty_run
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "m.tflite")])
    assert r.exit_code == 2 and "must end in .pt2" in r.output and ".onnx" in r.output
    assert not (tmp_path / "m.tflite").exists()


def test_without_the_onnx_packages_the_export_is_one_line(novelty_run, tmp_path, monkeypatch):
    import sys

    _, run = novelty_run
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript raises ImportError
    r = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / "m.onnx")])
    assert r.exit_code == 1 and "ONNX export needs the onnx packages: pip install 'tlearn[onnx]'" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()


def test_onnx_export_of_a_run_on_a_program_backbone(tiny_data, tmp_path):
    """A user's .pt2 backbone whose batch is bounded (1..1024): the ONNX batch axis stays dynamic."""
    from tests.test_extract import TinyNet

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    prog = torch.export.export(TinyNet().eval(), (torch.randn(2, 3, 224, 224),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(prog, str(tmp_path / "tiny.pt2"))
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(tiny_data), "--out", str(run), "--backbone", str(tmp_path / "tiny.pt2"),
                                 "--workers", "0", "--epochs", "2", "--no-plots"])
    assert r.exit_code == 0, r.output
    for name in ("m.pt2", "m.onnx"):
        r = CliRunner().invoke(cli, ["export", str(run), "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
    x = _photos(tiny_data, 3)
    want = torch.export.load(str(tmp_path / "m.pt2")).module()(x).detach().numpy()
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], want, atol=1e-4, rtol=0)
