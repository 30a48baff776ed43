"""Files from users are data, never code: pickle payloads are refused and never run."""
import pathlib

import pytest
import torch
from click.testing import CliRunner

from cli import cli
from pipeline import check_torch_version
from pipeline.finetune import FinetuneConfig, finetune


class Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def payload_file(path, marker, wrap=None):
    obj = {"conv1.weight": torch.zeros(1), "evil": Payload(marker)}
    torch.save(wrap(obj) if wrap else obj, path)
    return path


def test_weights_file_with_payload_is_refused(tiny_data, tmp_path):
    marker = tmp_path / "PWNED"
    w = payload_file(tmp_path / "evil.pt", marker)
    r = CliRunner().invoke(cli, ["extract", str(tiny_data), "--cache", str(tmp_path / "f.h5"), "--weights", str(w)])
    assert r.exit_code == 1
    assert f"Error: refused {w}: it is not a plain tensor file and loading it would run pickled code" in r.output
    assert not marker.exists() and not (tmp_path / "f.h5").exists()
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(tmp_path / "ft"), "--weights", str(w)])
    assert r.exit_code == 1 and "refused" in r.output and not marker.exists()


def test_model_pt_with_payload_is_refused_by_predict_and_export(tiny_data, tmp_path):
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    r = CliRunner().invoke(cli, ["run", str(tiny_data), "--out", str(run), "--weights", "none", "--workers", "0",
                                 "--epochs", "1", "--no-plots"])
    assert r.exit_code == 0, r.output
    payload_file(run / "model.pt", marker, wrap=lambda o: {"kind": "head", "state_dict": o})
    for args in (["predict", str(run), str(tiny_data / "val")], ["export", str(run), "--out", str(tmp_path / "m.pt2")]):
        r = CliRunner().invoke(cli, args)
        assert r.exit_code == 1
        assert f"Error: refused {run / 'model.pt'}: it holds pickled objects that weights_only loading will not run" \
            in r.output
        assert len(r.output.strip().splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "m.pt2").exists()


@pytest.mark.slow
def test_checkpoint_with_payload_is_refused_on_resume(tiny_data, tmp_path):
    marker = tmp_path / "PWNED"
    out = tmp_path / "ft"
    cfg = dict(data_dir=str(tiny_data), out=str(out), weights="none", workers=0, epochs=1, plots=False)
    finetune(FinetuneConfig(**cfg))
    payload_file(out / "checkpoint.pt", marker)
    r = CliRunner().invoke(cli, ["finetune", str(tiny_data), "--out", str(out), "--weights", "none", "--workers", "0",
                                 "--epochs", "1", "--resume"])
    assert r.exit_code == 1 and "refused" in r.output and "checkpoint.pt" in r.output
    assert not marker.exists()


def test_finetune_model_with_wrong_shapes_is_a_message(tiny_data, tmp_path):
    out = tmp_path / "ft"
    finetune(FinetuneConfig(str(tiny_data), str(out), weights="none", workers=0, epochs=1, plots=False))
    m = torch.load(out / "model.pt", weights_only=True)
    m["state_dict"]["fc.weight"] = torch.zeros(5, 7)
    torch.save(m, out / "model.pt")
    r = CliRunner().invoke(cli, ["predict", str(out), str(tiny_data / "val")])
    assert r.exit_code == 1
    assert "model.pt do not fit ResNet: 1 wrong shapes (first: fc.weight (5, 7) vs (2, 512))" in r.output


@pytest.mark.parametrize("version, ok", [("2.6.0", True), ("2.14.1+cu130", True), ("2.5.1", False),
                                         ("1.13.0", False), ("2.6.0a0+git", True)])
def test_old_torch_is_refused(version, ok):
    if ok:
        check_torch_version(version)
    else:
        with pytest.raises(ImportError, match="too old: this tool needs torch >= 2.6"):
            check_torch_version(version)
