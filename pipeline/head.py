"""Head training on cached features: the tutorial's recipe (nn.Linear, cross-entropy, SGD with momentum,
StepLR, batch 4, shuffled, keep the best-val epoch), for one head or a grid of heads at once.

The loop computes the linear layer's softmax cross-entropy gradient in closed form and applies
torch.optim.SGD's momentum rule by hand, for H heads stacked in one tensor: no autograd graph, no
optimizer objects, no per-batch gathers (each epoch is permuted once, batches are slices). The
result equals an autograd loop with nn.Linear + SGD + StepLR step for step (see tests/test_head.py).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass, field, fields

from typing import TYPE_CHECKING

import numpy as np

from . import PipelineError

if TYPE_CHECKING:  # torch is imported inside the functions: configs and HeadParams load without it
    import torch

SWEEPABLE = ("lr", "momentum", "step_size", "gamma", "seed", "batch_size", "epochs")


@dataclass(frozen=True)
class HeadParams:
    """One head's recipe; the defaults are the tutorial's."""

    epochs: int = 25
    lr: float = 0.001
    momentum: float = 0.9
    step_size: int = 7
    gamma: float = 0.1
    batch_size: int = 4
    seed: int = 0

    def lr_at(self, epoch: int) -> float:
        """StepLR: lr * gamma ** (epoch // step_size)."""
        return self.lr * self.gamma ** (epoch // self.step_size)


@dataclass
class HeadResult:
    params: HeadParams
    weight: torch.Tensor  # (C, D), best-val epoch
    bias: torch.Tensor  # (C,)
    best_val_acc: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    last_weight: torch.Tensor | None = None  # after the final epoch (for checks and warm starts)
    last_bias: torch.Tensor | None = None


def expand_grid(grid: dict[str, list]) -> list[HeadParams]:
    """Every combination of the listed values, in a stable order."""
    unknown = set(grid) - set(SWEEPABLE)
    if unknown:
        raise PipelineError(f"cannot sweep {', '.join(sorted(unknown))}")
    keys = [k for k in SWEEPABLE if k in grid]
    combos = itertools.product(*(grid[k] for k in keys))
    out = [HeadParams(**dict(zip(keys, c))) for c in combos]
    for p in out:
        if p.epochs < 1 or p.batch_size < 1 or p.step_size < 1 or p.lr <= 0:
            raise PipelineError(f"bad head recipe {asdict(p)}: epochs, batch size and step size must be >= 1, lr > 0")
    return out


def init_linear(in_dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's own initialisation under torch.manual_seed(seed), so heads match the tutorial's."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(in_dim, classes)
    return layer.weight.detach().clone(), layer.bias.detach().clone()


def _evaluate(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, y: torch.Tensor):
    """Mean loss and accuracy per head. W (H,C,D), b (H,C), X (N,D) -> (H,), (H,)."""
    import torch

    if len(y) == 0:
        z = torch.zeros(W.shape[0], device=W.device)
        return z, z
    logits = torch.einsum("nd,hcd->hnc", X, W) + b[:, None, :]
    loss = torch.logsumexp(logits, -1) - logits.gather(2, y.expand(W.shape[0], -1)[..., None]).squeeze(2)
    acc = (logits.argmax(-1) == y).float().mean(1)
    return loss.mean(1), acc


def _train_group(params: list[HeadParams], Xtr, ytr, Vtr, Xva, yva, classes: int) -> list[HeadResult]:
    """Heads that share epochs and batch size, trained in lockstep."""
    import torch

    H, (N, D), dev = len(params), Xtr.shape, Xtr.device
    epochs, B = params[0].epochs, params[0].batch_size
    W0, b0 = zip(*(init_linear(D, classes, p.seed) for p in params))
    W, b = torch.stack(W0).to(dev), torch.stack(b0).to(dev)  # (H,C,D), (H,C)
    bufW, bufb = torch.zeros_like(W), torch.zeros_like(b)  # momentum buffers; 0*m + g = g on step 1
    mom = torch.tensor([p.momentum for p in params], device=dev)
    gens = [torch.Generator().manual_seed(p.seed) for p in params]
    best_W, best_b = W.clone(), b.clone()
    best_acc = torch.full((H,), -1.0, device=dev)
    best_epoch = torch.zeros(H, dtype=torch.long, device=dev)
    hist = [[] for _ in params]
    eye = torch.eye(classes, device=dev)
    for epoch in range(epochs):
        lr = torch.tensor([p.lr_at(epoch) for p in params], device=dev)
        perm = torch.stack([torch.randperm(N, generator=g) for g in gens]).to(dev)  # (H,N)
        if Vtr is not None:  # one augmented view per image per epoch
            pick = torch.stack([torch.randint(Vtr.shape[1], (N,), generator=g) for g in gens]).to(dev)
            Xp = Vtr[perm, pick.gather(1, perm)]  # (H,N,D)
        else:
            Xp = Xtr[perm]  # (H,N,D)
        yp = ytr[perm]  # (H,N)
        Yp = eye[yp]  # (H,N,C)
        loss_sum = torch.zeros(H, device=dev)
        correct = torch.zeros(H, device=dev)
        for s in range(0, N, B):
            x, yb, Y = Xp[:, s:s + B], yp[:, s:s + B], Yp[:, s:s + B]
            logits = torch.baddbmm(b[:, None, :], x, W.transpose(1, 2))  # (H,b,C)
            lse = torch.logsumexp(logits, -1, keepdim=True)
            loss_sum += (lse.squeeze(-1) - (logits * Y).sum(-1)).sum(1)
            correct += (logits.argmax(-1) == yb).sum(1)
            g = (torch.exp(logits - lse) - Y) / x.shape[1]  # d(mean CE)/d logits
            bufW.mul_(mom[:, None, None]).add_(torch.bmm(g.transpose(1, 2), x))
            bufb.mul_(mom[:, None]).add_(g.sum(1))
            W.sub_(lr[:, None, None] * bufW)
            b.sub_(lr[:, None] * bufb)
        val_loss, val_acc = _evaluate(W, b, Xva, yva)
        better = val_acc > best_acc  # strict, as the tutorial: the first best epoch wins ties
        best_W[better], best_b[better] = W[better], b[better]
        best_acc = torch.where(better, val_acc, best_acc)
        best_epoch = torch.where(better, torch.full_like(best_epoch, epoch), best_epoch)
        rows = torch.stack([loss_sum / N, correct / N, val_loss, val_acc]).T.tolist()
        for h, (tl, ta, vl, va) in enumerate(rows):
            hist[h].append({"epoch": epoch, "lr": params[h].lr_at(epoch), "train_loss": tl, "train_acc": ta,
                            "val_loss": vl, "val_acc": va})
    return [HeadResult(p, best_W[h].cpu(), best_b[h].cpu(), float(best_acc[h]), int(best_epoch[h]), hist[h],
                       W[h].cpu(), b[h].cpu()) for h, p in enumerate(params)]


def train_heads(train: tuple, val: tuple, classes: int, params: list[HeadParams], views=None,
                device: str | torch.device = "cpu") -> tuple[list[HeadResult], float]:
    """Train every head in params. train/val: (features (N,D) float32, labels (N,) int64) arrays.

    views: optional (N,K,D) array of augmented train features; each epoch draws one per image.
    Returns the results in the order of params, and the wall time in seconds.
    """
    import torch

    dev = torch.device(device)
    Xtr = torch.as_tensor(np.asarray(train[0]), dtype=torch.float32, device=dev)
    ytr = torch.as_tensor(np.asarray(train[1]), dtype=torch.long, device=dev)
    Xva = torch.as_tensor(np.asarray(val[0]), dtype=torch.float32, device=dev)
    yva = torch.as_tensor(np.asarray(val[1]), dtype=torch.long, device=dev)
    Vtr = None if views is None else torch.as_tensor(np.asarray(views), dtype=torch.float32, device=dev)
    if len(ytr) == 0:
        raise PipelineError("the train split has no usable images")
    t0 = time.perf_counter()
    results: dict[int, HeadResult] = {}
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.epochs, p.batch_size), []).append(i)
    with torch.inference_mode():
        for idx in groups.values():
            for i, r in zip(idx, _train_group([params[i] for i in idx], Xtr, ytr, Vtr, Xva, yva, classes)):
                results[i] = r
    return [results[i] for i in range(len(params))], time.perf_counter() - t0


def head_logits(weight: torch.Tensor, bias: torch.Tensor, X) -> np.ndarray:
    import torch

    X = torch.as_tensor(np.asarray(X), dtype=torch.float32)
    return (X @ weight.T + bias).numpy()


def params_dict(p: HeadParams) -> dict:
    return {f.name: getattr(p, f.name) for f in fields(p)}
