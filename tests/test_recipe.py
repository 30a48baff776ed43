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


def test_cli_defaults_and_help_are_the_recipe_fields():
    head, ft = _params("train-head"), _params("finetune")
    names = {"batch_size": "head_batch_size", "seed": "head_seed"}
    for field in RECIPE_FIELDS:
        default = getattr(TUTORIAL_RECIPE, field)
        assert ft[field].default == default and ft[field].help == RECIPE_FIELDS[field].metadata["help"]
        assert head[names.get(field, field)].default == str(default)
    # a bound is checked by the option itself, from the field's metadata
    r = __import__("click.testing").testing.CliRunner().invoke(cli, ["finetune", ".", "--out", "x", "--lr", "nan"])
    assert r.exit_code == 2 and "nan is not a finite number" in r.output


def test_extract_and_finetune_share_their_data_options():
    ex, ft = _params("extract"), _params("finetune")
    shared = ["weights", "splits", "val_fraction", "test_fraction", "split_seed", "workers", "device", "precision",
              "allow_empty_class", "max_skipped"]
    for name in shared:
        assert ex[name].help and ex[name].help == ft[name].help, name
        assert ex[name].default == ft[name].default, name
    assert all(p.help for p in ft.values() if p.param_type_name == "option"), "every finetune option has help"
