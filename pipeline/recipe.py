"""The tutorial's training recipe, one place for each of its facts: default, allowed range, help text.

HeadParams is the recipe of one head (train-head) and the recipe finetune follows; its fields carry
their bounds and help as metadata, so the checks (recipe_problems) and the CLI's options (cli.py builds
--epochs, --lr, ... from these fields) cannot drift apart. Pure Python: importing it costs nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from . import PipelineError

MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed


def setting(default, kind: type, help: str, min=None, min_open: bool = False, max=None):
    """A recipe field: its default, its type and bounds (finite numbers only), and its help text."""
    return field(default=default, metadata={"kind": kind, "min": min, "min_open": min_open, "max": max,
                                            "help": help})


@dataclass(frozen=True)
class HeadParams:
    """One head's recipe; the defaults are the tutorial's (SGD with momentum, StepLR, batch 4, 25 epochs)."""

    epochs: int = setting(25, int, "Epochs; the best val epoch is kept.", min=1)
    lr: float = setting(0.001, float, "Learning rate (SGD).", min=0, min_open=True)
    momentum: float = setting(0.9, float, "SGD momentum.", min=0)
    step_size: int = setting(7, int, "StepLR: epochs between learning-rate decays.", min=1)
    gamma: float = setting(0.1, float, "StepLR: factor applied to the learning rate at each step.", min=0,
                           min_open=True)
    batch_size: int = setting(4, int, "Training batch size.", min=1)
    seed: int = setting(0, int, "Seed of the new layer's init, shuffling and augmentation draws.", min=0,
                        max=MAX_SEED)

    def __post_init__(self):
        check_recipe(**{f.name: getattr(self, f.name) for f in fields(self)})

    def lr_at(self, epoch: int) -> float:
        """StepLR: lr * gamma ** (epoch // step_size)."""
        return self.lr * self.gamma ** (epoch // self.step_size)


RECIPE_FIELDS = {f.name: f for f in fields(HeadParams)}


def bound_problem(name: str, value) -> str:
    """Why value is not allowed for recipe field name ('' when it is). NaN fails every comparison, so
    each rule is written as what must hold; infinity is refused as not finite."""
    m = RECIPE_FIELDS[name].metadata
    if not math.isfinite(value):
        return f"{value} is not a finite number"
    lo, hi = m["min"], m["max"]
    if lo is not None and not (value > lo if m["min_open"] else value >= lo):
        return f"{value} is not {'>' if m['min_open'] else '>='} {lo}"
    if hi is not None and not value <= hi:
        return f"{value} is not <= {hi}"
    return ""


def recipe_problems(**recipe) -> list[str]:
    """What is wrong with a recipe ([] when nothing), as name=value items."""
    return [f"{k}={v}" for k, v in recipe.items() if bound_problem(k, v)]


def check_recipe(**recipe) -> None:
    bad = recipe_problems(**recipe)
    if bad:
        raise PipelineError(f"bad recipe ({', '.join(bad)}): epochs, batch size and step size must be >= 1; lr and "
                            "gamma finite numbers > 0; momentum a finite number >= 0; seed from 0 to 2**63-1")


TUTORIAL_RECIPE = HeadParams()
