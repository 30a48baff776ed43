"""NaN and infinity: refused as flags, and a run whose loss, weights or features become non-finite stops with
a message and saves nothing as a model; predict never prints NaN."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import cli
from pipeline.head import HeadParams, train_heads


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "Invalid value for '--lr': nan is not a finite number"),
    (["--lr", "inf"], "Invalid value for '--lr': inf is not a finite number"),
    (["--lr", "0.001,nan"], "Invalid value for '--lr': nan is not a finite number"),
    (["--gamma", "nan"], "Invalid value for '--gamma': nan is not a finite number"),
    (["--gamma", "-0.1"], "Invalid value for '--gamma': -0.1 is not > 0"),
    (["--momentum", "-0.5"], "Invalid value for '--momentum': -0.5 is not >= 0"),
    (["--momentum", "0.9,-inf"], "Invalid value for '--momentum': -inf is not a finite number"),
    (["--epochs", "3,0"], "Invalid value for '--epochs': 0 is not >= 1"),
])
@pytest.mark.parametrize("command", ["train-head", "run", "finetune"])
def test_nonfinite_and_out_of_range_flags_are_refused(tmp_path, command, flags, message):
    (tmp_path / "f.h5").write_bytes(b"")
    target = tmp_path / "f.h5" if command == "train-head" else tmp_path
    if command == "finetune" and "," in flags[1]:
        flags = [flags[0], flags[1].split(",")[1]]  # finetune takes one value per flag
    r = invoke(command, target, "--out", tmp_path / "o", *flags)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1] == f"Error: {message}"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command, flag", [("train-head", "--seed"), ("run", "--head-seed"), ("finetune", "--seed")])
def test_seed_beyond_64_bits_is_refused(tmp_path, command, flag):
    (tmp_path / "f.h5").write_bytes(b"")
    target = tmp_path / "f.h5" if command == "train-head" else tmp_path
    r = invoke(command, target, "--out", tmp_path / "o", flag, str(2**64))
    assert r.exit_code == 2 and f"{2**64} is not <= {2**63 - 1}" in r.output


def test_recipe_is_checked_in_the_library_too():
    from pipeline import PipelineError

    for bad in (dict(lr=float("nan")), dict(gamma=float("inf")), dict(momentum=-1.0), dict(lr=0.0)):
        with pytest.raises(PipelineError, match=r"bad recipe \(.*\): .*lr and gamma finite numbers > 0"):
            HeadParams(**bad)


def toy(n=24, d=6, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return (rng.normal(size=(n, d)) + 3 * y[:, None]).astype(np.float32), y


def test_a_diverging_head_is_marked_and_never_best():
    X, y = toy()
    ok, bad = HeadParams(epochs=3), HeadParams(epochs=3, lr=1e38)
    results, _ = train_heads((X, y), (X, y), 2, [ok, bad])
    assert results[0].diverged_epoch is None and results[1].diverged_epoch == 0
    assert torch.isfinite(results[1].weight).all()  # best-so-far never takes non-finite weights


def test_nonfinite_features_are_refused():
    from pipeline.head import NonFiniteFeatures

    X, y = toy()
    X[3, 2] = np.nan
    X[5, 0] = np.inf
    with pytest.raises(NonFiniteFeatures, match="2 of 24 train feature rows hold NaN or infinity"):
        train_heads((X, y), toy()[0:2], 2, [HeadParams(epochs=1)])
    with pytest.raises(NonFiniteFeatures, match="2 of 24 val feature rows"):
        train_heads(toy(), (X, y), 2, [HeadParams(epochs=1)])


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    from tests.conftest import small_extracted

    return small_extracted(tmp_path_factory.mktemp("nf"))


def test_train_head_that_diverges_saves_nothing(tiny_cache, tmp_path):
    _, cache = tiny_cache
    out = tmp_path / "run"
    r = invoke("train-head", cache, "--out", out, "--lr", "1e38", "--epochs", 2, "--no-plots")
    assert r.exit_code == 1, r.output
    assert r.output.strip() == ("Error: training diverged: the loss or the weights became NaN or infinite (epoch 0, "
                                "lr 1e+38); nothing was saved; lower --lr")
    assert not (out / "model.pt").exists() and not (out / "metrics.json").exists()


def test_sweep_keeps_the_heads_that_did_not_diverge(tiny_cache, tmp_path):
    _, cache = tiny_cache
    out = tmp_path / "run"
    r = invoke("train-head", cache, "--out", out, "--lr", "0.001,1e38", "--epochs", 2, "--no-plots")
    assert r.exit_code == 0, r.output
    assert "     1e+38  diverged in epoch 0 (not used)" in r.output and "<- best" in r.output
    text = (out / "metrics.json").read_text()
    m = json.loads(text)
    assert m["recipe"]["lr"] == 0.001 and m["sweep"][1]["diverged_epoch"] == 0
    assert "diverged_epoch" not in m["sweep"][0] and "NaN" not in text and "Infinity" not in text


def test_predict_json_never_prints_nan(tiny_cache, tmp_path):
    data, cache = tiny_cache
    out = tmp_path / "run"
    assert invoke("train-head", cache, "--out", out, "--epochs", 1, "--no-plots").exit_code == 0
    m = torch.load(out / "model.pt", weights_only=True)
    m["state_dict"]["weight"][0, 0] = float("nan")  # a broken model file gives NaN scores
    torch.save(m, out / "model.pt")
    img = data / "val/ants/img_000.jpg"
    r = CliRunner().invoke(cli, ["predict", str(out), str(img), "--json"])
    assert r.exit_code == 1  # no input could be classified
    def bare_constant(c):
        raise AssertionError(f"invalid JSON: bare {c}")

    rows = json.loads(r.stdout[: r.stdout.rindex("]") + 1], parse_constant=bare_constant)
    assert rows == [{"path": str(img), "error": "the model gave NaN or infinite scores for this image"}]


def test_finetune_on_nan_weights_stops_and_saves_no_model(tiny_cache, tmp_path, resnet18_state_file):
    data, _ = tiny_cache
    sd = torch.load(resnet18_state_file, weights_only=True)
    sd["conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(sd, tmp_path / "nan.pt")
    out = tmp_path / "ft"
    r = invoke("finetune", data, "--out", out, "--weights", tmp_path / "nan.pt", "--workers", 0, "--epochs", 2,
               "--no-plots")
    assert r.exit_code == 1, r.output
    assert r.output.strip() == ("Error: finetune diverged in epoch 0: the train loss (nan) became NaN or infinite; "
                                "nothing was saved as a model (no checkpoint was written); lower --lr (or check "
                                "--weights) and start again in a new --out")
    assert not (out / "model.pt").exists() and not (out / "checkpoint.pt").exists()
