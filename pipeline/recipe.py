"""The tutorial's training recipe, one place for each of its facts: default, allowed range, help text.

HeadParams is the recipe of one head (train-head) and the recipe finetune follows; its fields carry
their bounds and help as metadata, so the checks (recipe_problems) and the CLI's options (cli.py builds
--epochs, --lr, ... from these fields) cannot drift apart. Pure Python: importing it costs nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from . import PipelineError

MAX_SEED = 2**63 - 1  # torch.manual_seed takes a 64-bit seed


def setting(default, kind: type, help: str, min=None, min_open: bool = False, max=None):
    """A recipe field: its default, its type and bounds (finite numbers only, see number_problem), its help text."""
    return field(default=default, metadata={"kind": kind, "bounds": {"min": min, "min_open": min_open, "max": max},
                                            "help": help})


def number_problem(value, min=None, min_open: bool = False, max=None, max_open: bool = False) -> str:
    """Why value is not a finite number within the bounds ('' when it is): the one check of the recipe's fields and
    of the CLI's number flags. NaN fails every comparison, so each rule is written as what must hold; infinity is
    refused as not finite."""
    if not math.isfinite(value):
        return f"{value} is not a finite number"
    if min is not None and not (value > min if min_open else value >= min):
        return f"{value} is not {'>' if min_open else '>='} {min}"
    if max is not None and not (value < max if max_open else value <= max):
        return f"{value} is not {'<' if max_open else '<='} {max}"
    return ""


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
        """The learning rate of epoch (0-based), as torch.optim.lr_scheduler.StepLR gives it."""
        return self.lrs(epoch + 1)[-1]

    def lrs(self, epochs: int) -> list[float]:
        """StepLR's learning rate of each epoch: lr, times gamma at every step_size-th epoch. One multiplication per
        boundary, as torch's scheduler does: the closed form lr * gamma ** k differs by an ulp from some k on."""
        out, lr = [], self.lr
        for epoch in range(epochs):
            if epoch and epoch % self.step_size == 0:
                lr *= self.gamma
            out.append(lr)
        return out


RECIPE_FIELDS = {f.name: f for f in fields(HeadParams)}


def bound_problem(name: str, value) -> str:
    """Why value is not allowed for recipe field name ('' when it is)."""
    return number_problem(value, **RECIPE_FIELDS[name].metadata["bounds"])


def recipe_problems(**recipe) -> list[str]:
    """What is wrong with a recipe ([] when nothing), as name=value items."""
    return [f"{k}={v}" for k, v in recipe.items() if bound_problem(k, v)]


def check_recipe(**recipe) -> None:
    bad = recipe_problems(**recipe)
    if bad:
        raise PipelineError(f"bad recipe ({', '.join(bad)}): epochs, batch size and step size must be >= 1; lr and "
                            "gamma finite numbers > 0; momentum a finite number >= 0; seed from 0 to 2**63-1")


TUTORIAL_RECIPE = HeadParams()


# --------------------------------------------------------------------------- the default: a tuned linear probe

RECIPES = ("auto", "tutorial")  # --recipe: auto = chosen by cross-validation on train; tutorial = the seed recipe
RECIPE_FLAGS = ("epochs", "lr", "momentum", "step_size", "gamma", "batch_size")  # any of them: the tutorial's family


@dataclass(frozen=True)
class ProbeParams:
    """One candidate of the automatic recipe: the seed recipe's family (cross-entropy, SGD with momentum,
    shuffled mini-batches) on standardised features (train's mean and std, folded into the saved layer),
    from a zero layer, with weight decay and a cosine learning-rate decay to 0 over the epochs; the last
    epoch is kept. Batch size comes from the number of train rows (about 16 steps per epoch or more)."""

    lr: float
    epochs: int
    batch_size: int
    weight_decay: float = 0.0
    momentum: float = 0.9
    seed: int = 0
    standardize: bool = True

    def lr_at(self, step: float) -> float:
        """Cosine decay from lr to 0; step is in epochs (fractions within an epoch)."""
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(step / self.epochs, 1.0)))

    def name(self) -> str:
        wd = f", wd {self.weight_decay:g}" if self.weight_decay else ""
        return f"probe lr {self.lr:g}, {self.epochs} epochs, batch {self.batch_size}{wd}"


AUTO_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)  # on standardised features the main knob: measured best on real
#   features at 0.001-0.003 (ants vs bees, EfficientNet-Lite0/1), 0.01-0.1 (scanned digits, same backbones), 0.1
#   (raw digit pixels)
AUTO_WEIGHT_DECAY = 0.01  # 5-fold CV on digits (Lite1): +0.3 to +0.7 points over none at lr 0.01-0.1, never lower
#   on ants vs bees; 0.03 and 0.1 were lower
AUTO_STEPS = (600,)  # optimizer steps of a run; its epochs follow from the rows (with weight decay 900 steps
#   scored 0.3-0.7 points above 300 on digits; 600 keeps 20,000 rows within the time goal)
AUTO_TUTORIAL_MAX_ROWS = 600  # the tutorial's batch-4 recipe joins the grid up to this many rows per fold
#                                (25 epochs of batch 4 are thousands of sequential steps)
AUTO_CV_MAX_ROWS = 5000  # more train rows: the CV runs on a stratified subset of about this many (its estimates
#                          are already precise; the CV's cost stays bounded), the winner then trains on all rows


def probe_batch(n_rows: int) -> int:
    """Batch of the automatic recipe: about 16 steps per epoch, 16 to 256 rows."""
    return int(min(256, max(16, n_rows // 16)))


def auto_folds(n_rows: int) -> int:
    return 5 if n_rows <= 2000 else 3


def scaled_to(p: ProbeParams, cv_rows: int, n_rows: int) -> ProbeParams:
    """The candidate chosen on a CV subset of cv_rows training rows, for n_rows: the same number of optimizer
    steps (the same batch), so the final fit costs what one CV head did and follows the same schedule."""
    if n_rows <= cv_rows:
        return p
    steps = p.epochs * math.ceil(cv_rows / p.batch_size)
    return replace(p, epochs=max(1, round(steps / math.ceil(n_rows / p.batch_size))))


def auto_grid(n_rows: int, seed: int = 0) -> list:
    """The candidates of --recipe auto for n_rows train rows: the tutorial's recipe (when its batch-4 run is
    cheap enough) first, so that it wins ties, then the probe's learning rates x run lengths."""
    batch = probe_batch(n_rows)
    per_epoch = max(1, math.ceil(n_rows / batch))
    lengths = sorted({max(2, math.ceil(s / per_epoch)) for s in AUTO_STEPS})
    grid: list = [HeadParams(seed=seed)] if n_rows <= AUTO_TUTORIAL_MAX_ROWS else []
    grid += [ProbeParams(lr=lr, epochs=e, batch_size=batch, weight_decay=AUTO_WEIGHT_DECAY, seed=seed)
             for lr in AUTO_LRS for e in lengths]
    return grid
