"""The recipe's facts live in pipeline/recipe.py once: the CLI's defaults, bounds and help come from there."""
import math

import pytest

from cli import cli
from pipeline import PipelineError
from pipeline.recipe import RECIPE_FIELDS, TUTORIAL_RECIPE, HeadParams, bound_problem, recipe_problems


def _params(command: str) -> dict:
    return {p.name: p for p in cli.commands[command].params}


def test_tutorial_recipe_is_the_seed_recipe():
    assert (TUTORIAL_RECIPE.epochs, TUTORIAL_RECIPE.lr, TUTORIAL_RECIPE.momentum, TUTORIAL_RECIPE.step_size,
            TUTORIAL_RECIPE.gamma, TUTORIAL_RECIPE.batch_size, TUTORIAL_RECIPE.seed) == (25, 0.001, 0.9, 7, 0.1, 4, 0)


@pytest.mark.parametrize("name,value,bad", [
    ("lr", math.nan, True), ("lr", math.inf, True), ("lr", 0.0, True), ("lr", 1e-9, False),
    ("gamma", math.nan, True), ("momentum", -0.1, True), ("momentum", 0.0, False), ("epochs", 0, True),
    ("seed", 2**63, True), ("seed", 2**63 - 1, False), ("batch_size", 1, False)])
def test_bounds_come_from_the_fields(name, value, bad):
    assert bool(bound_problem(name, value)) is bad
    assert bool(recipe_problems(**{name: value})) is bad


def test_head_params_refuse_a_bad_recipe():
    with pytest.raises(PipelineError, match=r"bad recipe \(lr=nan\)"):
        HeadParams(lr=math.nan)


def _parsed(command: str, *args) -> dict:
    """The values click gives the command for these arguments (its types and defaults applied)."""
    return cli.commands[command].make_context(command, [str(a) for a in args]).params


SEED_RECIPE = {"epochs": 25, "lr": 0.001, "momentum": 0.9, "step_size": 7, "gamma": 0.1, "batch_size": 4, "seed": 0}


def test_cli_defaults_and_help_are_the_recipe_fields(tmp_path):
    head, ft = _params("train-head"), _params("finetune")
    names = {"batch_size": "head_batch_size", "seed": "head_seed"}
    for field in RECIPE_FIELDS:
        assert ft[field].help == RECIPE_FIELDS[field].metadata["help"]
    # the values click parses when no flag is given are the tutorial's numbers (typed here by hand)
    (tmp_path / "f.h5").touch()
    got_ft = _parsed("finetune", tmp_path, "--out", tmp_path / "o")
    got_head = _parsed("train-head", tmp_path / "f.h5", "--out", tmp_path / "o")
    assert {f: (got_ft[f], type(got_ft[f])) for f in SEED_RECIPE} == {f: (v, type(v)) for f, v in SEED_RECIPE.items()}
    assert {f: got_head[names.get(f, f)] for f in SEED_RECIPE} == {f: (v,) for f, v in SEED_RECIPE.items()}
    assert sorted(RECIPE_FIELDS) == sorted(SEED_RECIPE)
    # a bound is checked by the option itself, from the field's metadata
    r = __import__("click.testing").testing.CliRunner().invoke(cli, ["finetune", ".", "--out", "x", "--lr", "nan"])
    assert r.exit_code == 2 and "nan is not a finite number" in r.output


def test_extract_and_finetune_share_their_data_options(tmp_path):
    ex, ft = _params("extract"), _params("finetune")
    defaults = {"weights": "imagenet", "splits": ("train", "val"), "val_fraction": None, "test_fraction": None,
                "split_seed": 0, "workers": 2, "device": "auto", "precision": "auto", "allow_empty_class": False,
                "max_skipped": None}
    for name in defaults:  # one help each, but precision's: extract trains nothing (no grad scaler)
        assert ex[name].help and (ex[name].help == ft[name].help) == (name != "precision"), name
    assert "grad scaler" in ft["precision"].help and "grad scaler" not in ex["precision"].help
    flags = ["--weights", "none", "--splits", "train,holdout", "--val-fraction", "0.25", "--split-seed", "3",
             "--workers", "0", "--device", "cpu", "--precision", "fp32", "--allow-empty-class", "--max-skipped", "5"]
    given = {"weights": "none", "splits": ("train", "holdout"), "val_fraction": 0.25, "test_fraction": None,
             "split_seed": 3, "workers": 0, "device": "cpu", "precision": "fp32", "allow_empty_class": True,
             "max_skipped": 5.0}
    for args, want in (([], defaults), (flags, given)):
        got_ex = _parsed("extract", tmp_path, "--cache", tmp_path / "x.h5", *args)
        got_ft = _parsed("finetune", tmp_path, "--out", tmp_path / "o", *args)
        assert {n: got_ex[n] for n in want} == want == {n: got_ft[n] for n in want}
    assert all(p.help for p in ft.values() if p.param_type_name == "option"), "every finetune option has help"


@pytest.mark.parametrize("lr,step_size,gamma", [(0.001, 7, 0.1), (0.01, 1, 0.1), (0.3, 1, 0.9), (0.05, 3, 0.5),
                                                (1e-4, 13, 0.37)])
def test_lr_at_is_torch_steplr(lr, step_size, gamma):
    """The same float multiplications as torch's StepLR, so equal to the bit (the closed form is not, from an
    epoch on)."""
    import torch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size, gamma)
    torch_lrs = []
    for _ in range(61):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    p = HeadParams(lr=lr, step_size=step_size, gamma=gamma)
    assert p.lrs(61) == torch_lrs
    assert [p.lr_at(e) for e in range(61)] == torch_lrs


def test_cli_recipe_flags_check_with_the_fields_bounds():
    """A recipe flag's check is the recipe's own: the same verdict and words for every field and value."""
    values = [math.nan, math.inf, -math.inf, -1, 0, 1e-9, 0.5, 1, 2**63 - 1, 2**63]
    for command, names in (("finetune", {}), ("train-head", {"batch_size": "head_batch_size", "seed": "head_seed"})):
        params = _params(command)
        for field in RECIPE_FIELDS:
            check = params[names.get(field, field)].type.problem
            assert [check(v) for v in values] == [bound_problem(field, v) for v in values], (command, field)
