"""Head training on cached features: the tutorial's recipe (nn.Linear, cross-entropy, SGD with momentum,
StepLR, batch 4, shuffled, keep the best-val epoch), for one head or a grid of heads at once.

The loop computes the linear layer's softmax cross-entropy gradient in closed form and applies
torch.optim.SGD's momentum rule by hand (sgd_momentum), for H heads stacked in one tensor: no autograd graph,
no optimizer objects, no per-batch gathers (each epoch is permuted once, batches are slices). One loop
(_train_rows_group) serves train_heads (every head on all rows), the K-fold CV and the learning curve (each head
on its own rows). The result equals an autograd loop with nn.Linear + SGD + StepLR step for step (see
tests/test_head.py).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import dataclass, field, fields

from typing import TYPE_CHECKING

import numpy as np

from . import PipelineError
from .recipe import HeadParams, check_recipe, recipe_problems  # noqa: F401  (the recipe lives there)
from .folds import stratified_folds  # noqa: F401  (fold assignment lives in folds.py; kept importable here)

if TYPE_CHECKING:  # torch is imported inside the functions: configs and HeadParams load without it
    import torch

SWEEPABLE = ("lr", "momentum", "step_size", "gamma", "seed", "batch_size", "epochs")


class TrainingDiverged(PipelineError):
    """The loss or the weights became NaN or infinite: nothing is saved as a model."""


class NonFiniteFeatures(PipelineError):
    """The features given to a head hold NaN or infinity (a broken backbone or weights file)."""


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
    diverged_epoch: int | None = None  # the epoch whose loss or weights became non-finite (None: never)


def expand_grid(grid: dict[str, list]) -> list[HeadParams]:
    """Every combination of the listed values, in a stable order."""
    unknown = set(grid) - set(SWEEPABLE)
    if unknown:
        raise PipelineError(f"cannot sweep {', '.join(sorted(unknown))}")
    keys = [k for k in SWEEPABLE if k in grid]
    combos = itertools.product(*(grid[k] for k in keys))
    return [HeadParams(**dict(zip(keys, c))) for c in combos]  # each checks itself


def init_linear(in_dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.Linear's own initialisation under torch.manual_seed(seed), so heads match the tutorial's."""
    import torch
    from torch import nn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layer = nn.Linear(in_dim, classes)
    return layer.weight.detach().clone(), layer.bias.detach().clone()


def _loss_and_accuracy(W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, y: torch.Tensor):
    """Mean loss and accuracy per head. W (H,C,D), b (H,C), X (N,D) -> (H,), (H,)."""
    import torch

    if len(y) == 0:
        z = torch.zeros(W.shape[0], device=W.device)
        return z, z
    logits = torch.einsum("nd,hcd->hnc", X, W) + b[:, None, :]
    loss = torch.logsumexp(logits, -1) - logits.gather(2, y.expand(W.shape[0], -1)[..., None]).squeeze(2)
    acc = (logits.argmax(-1) == y).float().mean(1)
    return loss.mean(1), acc


def sgd_momentum(w: torch.Tensor, buf: torch.Tensor, grad: torch.Tensor, lr, momentum, active=None):
    """One step of torch.optim.SGD with momentum (dampening 0, no Nesterov; weight decay, if any, is already in
    grad): buf = momentum * buf + grad, w = w - lr * buf. Returns the new (w, buf); a buffer of zeros gives torch's
    first step (buf = grad). active: a mask that broadcasts to w; where it is False, w and buf stay as they were."""
    buf_new = buf * momentum + grad
    w_new = w - lr * buf_new
    if active is None:
        return w_new, buf_new
    import torch

    return torch.where(active, w_new, w), torch.where(active, buf_new, buf)


def _epoch_order(rows: list[torch.Tensor], gens: list, N: int, views: int | None):
    """One epoch's order of each head's rows, padded to N: perm (H,N) row ids of X and, with views per row, the
    view each row takes (H,N) (else None). Head h draws from its own generator what the tutorial's loop draws on
    X[rows[h]] alone: a permutation of its rows, then one view per row."""
    import torch

    dev = rows[0].device
    perm = torch.zeros(len(rows), N, dtype=torch.long, device=dev)
    pick = None if views is None else torch.zeros_like(perm)
    for h, (r, g) in enumerate(zip(rows, gens)):
        pos = torch.randperm(len(r), generator=g).to(dev)
        perm[h, :len(r)] = r[pos]
        if pick is not None:
            pick[h, :len(r)] = torch.randint(views, (len(r),), generator=g).to(dev)[pos]
    return perm, pick


def _scorer(heldout, X: torch.Tensor, y: torch.Tensor):
    """score(W, b) -> (mean loss (H,), accuracy (H,)) of each head on its held-out rows. heldout: (Xv, yv), rows
    that every head is scored on, or per head a tensor of row ids of X (gathered here once), or None: nothing
    to score (zeros; only the last epoch is wanted)."""
    import torch

    if heldout is None:
        return lambda W, b: (torch.zeros(W.shape[0], device=W.device),) * 2
    if isinstance(heldout, tuple):
        return lambda W, b: _loss_and_accuracy(W, b, *heldout)
    H, M = len(heldout), max(1, max(len(r) for r in heldout))
    idx = torch.zeros(H, M, dtype=torch.long, device=X.device)
    mask = torch.zeros(H, M, dtype=torch.bool, device=X.device)
    for h, r in enumerate(heldout):
        idx[h, :len(r)], mask[h, :len(r)] = r, True
    Xh, yh, count = X[idx], y[idx], mask.sum(1).clamp(min=1)  # (H,M,D), (H,M), (H,)

    def score(W, b):
        logits = Xh @ W.transpose(1, 2) + b[:, None, :]  # (H,M,C)
        nll = torch.logsumexp(logits, -1) - logits.gather(2, yh[..., None]).squeeze(2)
        return torch.where(mask, nll, 0).sum(1) / count, ((logits.argmax(-1) == yh) & mask).sum(1) / count

    return score


def _train_rows_group(params: list[HeadParams], rows: list[torch.Tensor], heldout, X: torch.Tensor,
                      y: torch.Tensor, classes: int, segment_rows: int = 8192, cw=None, views=None
                      ) -> list[HeadResult]:
    """The tutorial's recipe for heads that share epochs and batch size, each on its own rows of X, in lockstep.

    Head h does what the tutorial's loop does on X[rows[h]] alone: its permutation of its rows from its own
    generator, batches of B slices of it (the last one short), one view per row and epoch from views (N,K,D) if
    given. Shorter heads are padded to the longest: padded rows get no gradient, a batch's gradient is the mean
    over the head's own rows in it, and a head with no rows left in a batch takes no step (its momentum buffer and
    weights stay as they are), as if that batch did not exist for it. Each epoch scores every head on heldout (see
    _scorer) and keeps its first best epoch. Returns a HeadResult per head (last_weight: after the final epoch).
    """
    import torch

    H, D, dev = len(params), X.shape[1], X.device
    epochs, B = params[0].epochs, params[0].batch_size
    n = torch.tensor([len(r) for r in rows], device=dev)  # (H,)
    N, n_min = int(n.max()), int(n.min())
    W0, b0 = zip(*(init_linear(D, classes, p.seed) for p in params))
    W, b = torch.stack(W0).to(dev), torch.stack(b0).to(dev)  # (H,C,D), (H,C)
    bufW, bufb = torch.zeros_like(W), torch.zeros_like(b)  # momentum buffers
    mom = torch.tensor([p.momentum for p in params], device=dev)
    momW, momb = mom[:, None, None], mom[:, None]
    lrs = [p.lrs(epochs) for p in params]
    lr_epoch = torch.tensor(lrs, device=dev).T  # (epochs,H)
    gens = [torch.Generator().manual_seed(p.seed) for p in params]
    eye = torch.eye(classes, device=dev)
    valid = torch.arange(N, device=dev)[None, :] < n[:, None]  # (H,N) real rows of each head's padded order
    score = _scorer(heldout, X, y)
    best_W, best_b = W.clone(), b.clone()
    best_acc = torch.full((H,), -1.0, device=dev)
    best_epoch = torch.zeros(H, dtype=torch.long, device=dev)
    diverged = torch.full((H,), -1, dtype=torch.long, device=dev)  # epoch a head went non-finite, -1: never
    hist = [[] for _ in params]
    seg = B * max(1, segment_rows // B)  # gather this many permuted rows at a time: memory H x seg x D
    for epoch in range(epochs):
        lrW, lrb = lr_epoch[epoch][:, None, None], lr_epoch[epoch][:, None]
        perm, pick = _epoch_order(rows, gens, N, None if views is None else views.shape[1])
        loss_sum = torch.zeros(H, device=dev)
        correct = torch.zeros(H, device=dev)
        for a in range(0, N, seg):
            ps, ys = perm[:, a:a + seg], y[perm[:, a:a + seg]]  # (H,s)
            Xs = X[ps] if views is None else views[ps, pick[:, a:a + seg]]  # (H,s,D)
            Ys = eye[ys]  # (H,s,C)
            cws = None if cw is None else cw[ys][..., None]
            Ls = torch.empty_like(Ys)  # each batch's logits, for the epoch's train loss and accuracy
            for s in range(0, Xs.shape[1], B):
                x, t = Xs[:, s:s + B], a + s
                w = x.shape[1]
                # matmul, not baddbmm/bmm: the same sums here, but bmm on small strided batches is ~100x
                # slower on a busy CPU (thread hand-off), measured 6 ms against 14 us per call
                logits = x @ W.transpose(1, 2) + b[:, None, :]  # (H,w,C)
                Ls[:, s:s + w] = logits
                g = torch.exp(logits - torch.logsumexp(logits, -1, keepdim=True)) - Ys[:, s:s + w]
                active = None
                if t + w <= n_min:  # every head has w rows here: d(mean CE)/d logits
                    g = g / w
                else:  # past the end of some head's rows
                    cnt = (n - t).clamp(0, w)
                    g = g / cnt.clamp(min=1)[:, None, None] * valid[:, t:t + w, None]
                    active = cnt > 0
                if cws is not None:  # --class-weight: each row's loss times its class's weight (mean over the batch)
                    g = g * cws[:, s:s + w]
                W, bufW = sgd_momentum(W, bufW, g.transpose(1, 2) @ x, lrW, momW,
                                       None if active is None else active[:, None, None])
                b, bufb = sgd_momentum(b, bufb, g.sum(1), lrb, momb, None if active is None else active[:, None])
            real = valid[:, a:a + seg]
            nll = torch.logsumexp(Ls, -1) - Ls.gather(2, ys[..., None]).squeeze(2)
            loss_sum += torch.where(real, nll, 0).sum(1)
            correct += ((Ls.argmax(-1) == ys) & real).sum(1)
        finite = torch.isfinite(loss_sum) & torch.isfinite(W).flatten(1).all(1) & torch.isfinite(b).all(1)
        diverged = torch.where(~finite & (diverged < 0), torch.full_like(diverged, epoch), diverged)
        val_loss, val_acc = score(W, b)
        # strict, as the tutorial: the first best epoch wins ties; a diverged head never becomes "best"
        better = (val_acc > best_acc) & (diverged < 0)
        best_W[better], best_b[better] = W[better], b[better]
        best_acc = torch.where(better, val_acc, best_acc)
        best_epoch = torch.where(better, torch.full_like(best_epoch, epoch), best_epoch)
        stats = torch.stack([loss_sum / n, correct / n, val_loss, val_acc]).T.tolist()
        for h, (tl, ta, vl, va) in enumerate(stats):
            hist[h].append({"epoch": epoch, "lr": lrs[h][epoch], "train_loss": tl, "train_acc": ta,
                            "val_loss": vl, "val_acc": va})
    return [HeadResult(p, best_W[h].cpu(), best_b[h].cpu(), float(best_acc[h]), int(best_epoch[h]), hist[h],
                       W[h].cpu(), b[h].cpu(), int(diverged[h]) if diverged[h] >= 0 else None)
            for h, p in enumerate(params)]


def check_finite_features(name: str, X: torch.Tensor | None) -> None:
    import torch

    if X is None or len(X) == 0:
        return
    if np.isfinite(float(X.sum(dtype=torch.float64))):  # float64 cannot overflow on float32 rows: all finite
        return
    bad = int((~torch.isfinite(X.flatten(1))).any(1).sum())
    if bad:
        raise NonFiniteFeatures(f"{bad} of {len(X)} {name} feature rows hold NaN or infinity: the backbone gave "
                                "unusable outputs; check its weights and extract again (with --force)")


def train_heads(train: tuple, val: tuple, classes: int, params: list[HeadParams], views=None,
                device: str | torch.device = "cpu", class_weight=None) -> tuple[list[HeadResult], float]:
    """Train every head in params. train/val: (features (N,D) float32, labels (N,) int64) arrays.

    views: optional (N,K,D) array of augmented train features; each epoch draws one per image.
    class_weight: optional (C,) weight of each class's rows in the loss (None: the tutorial's plain mean).
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
    for name, X in (("train", Xtr), ("val", Xva), ("train view", Vtr)):
        check_finite_features(name, X)
    t0 = time.perf_counter()
    results: dict[int, HeadResult] = {}
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.epochs, p.batch_size), []).append(i)
    with torch.inference_mode():
        for idx in groups.values():
            cw = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32, device=dev)
            every_row = [torch.arange(len(ytr), device=dev)] * len(idx)
            trained = _train_rows_group([params[i] for i in idx], every_row, (Xva, yva), Xtr, ytr, classes, cw=cw,
                                        views=Vtr)
            results.update(zip(idx, trained))
    return [results[i] for i in range(len(params))], time.perf_counter() - t0


def head_logits(weight: torch.Tensor, bias: torch.Tensor, X) -> np.ndarray:
    import torch

    X = torch.as_tensor(np.asarray(X), dtype=torch.float32)
    return (X @ weight.T + bias).numpy()


def params_dict(p: HeadParams) -> dict:
    return {f.name: getattr(p, f.name) for f in fields(p)}


# --------------------------------------------------------------------------- k-fold cross-validation


@dataclass
class FoldRun:
    """One head of a cross-validation: params trained on every row outside fold, scored on fold."""

    params: HeadParams
    fold: int
    weight: torch.Tensor  # (C, D) after the final epoch: no epoch is picked on the held-out rows
    bias: torch.Tensor  # (C,)
    heldout_acc: float  # accuracy on the fold's rows after the final epoch
    history: list[float] = field(default_factory=list)  # held-out accuracy per epoch (for checks)


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run with n intra-op threads, then restore (None: unchanged). A head's matrices are tiny (H x 4 x 512):
    a second thread only adds hand-off latency, which on a loaded CPU grows to milliseconds per call
    (measured 0.05 s against 2.9 s for the same 3-epoch, 5-fold run on a busy 2-core machine; 0.14 s vs
    0.63 s for train-head on the real data's cache beside a second process)."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_folds(X, y, classes: int, params: list[HeadParams], folds, device: str | torch.device = "cpu",
                class_weight=None, views=None) -> tuple[list[list[FoldRun]], float]:
    """K-fold cross-validation of every setting in params, all folds x settings trained at once.

    X (N,D), y (N,), folds (N,) fold id per row (see folds.grouped_folds). views: optional (N,K,D) augmented
    rows, drawn as train_heads draws them, by each head from its training rows only (a held-out row is scored
    on its features, its views never seen). Returns, per setting, its K FoldRuns in fold order, and the
    training wall time in seconds.
    """
    import torch

    dev = torch.device(device)
    Xt = torch.as_tensor(np.asarray(X), dtype=torch.float32, device=dev)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long, device=dev)
    folds = np.asarray(folds)
    K = int(folds.max()) + 1 if len(folds) else 0
    Vt = None if views is None else torch.as_tensor(np.asarray(views), dtype=torch.float32, device=dev)
    check_finite_features("train view", Vt)
    rows = [torch.as_tensor(np.flatnonzero(folds != f), device=dev) for f in range(K)]
    held = [torch.as_tensor(np.flatnonzero(folds == f), device=dev) for f in range(K)]
    if any(len(r) == 0 for r in rows) or any(len(r) == 0 for r in held):
        raise PipelineError(f"every one of the {K} folds needs rows to train on and rows to score")
    heads = [(i, f) for i in range(len(params)) for f in range(K)]
    groups: dict[tuple, list[int]] = {}
    for j, (i, _) in enumerate(heads):
        groups.setdefault((params[i].epochs, params[i].batch_size), []).append(j)
    out: dict[int, FoldRun] = {}
    t0 = time.perf_counter()
    with torch.inference_mode(), cpu_threads(1 if dev.type == "cpu" else None):
        for js in groups.values():
            trained = _train_rows_group([params[heads[j][0]] for j in js], [rows[heads[j][1]] for j in js],
                                        [held[heads[j][1]] for j in js], Xt, yt, classes,
                                        cw=None if class_weight is None else torch.as_tensor(class_weight, device=dev),
                                        views=Vt)
            for j, r in zip(js, trained):
                i, f = heads[j]
                accs = [e["val_acc"] for e in r.history]
                out[j] = FoldRun(params[i], f, r.last_weight, r.last_bias, accs[-1], accs)
    seconds = time.perf_counter() - t0
    return [[out[i * K + f] for f in range(K)] for i in range(len(params))], seconds


def cv_summary(runs: list[FoldRun]) -> dict:
    """mean, std (population, ddof 0) and per-fold held-out accuracies of one setting."""
    accs = np.array([r.heldout_acc for r in runs], dtype=np.float64)
    return {"folds": len(runs), "mean": float(accs.mean()), "std": float(accs.std()), "per_fold": accs.tolist()}


def out_of_fold_proba(X, folds, runs: list[FoldRun]) -> np.ndarray:
    """(N,C) class probabilities of each row from the head that never saw it."""
    X = np.asarray(X, dtype=np.float32)
    folds = np.asarray(folds)
    proba = np.zeros((len(X), runs[0].weight.shape[0]), dtype=np.float64)
    for r in runs:
        m = folds == r.fold
        z = head_logits(r.weight, r.bias, X[m]).astype(np.float64)
        z -= z.max(1, keepdims=True)
        e = np.exp(z)
        proba[m] = e / e.sum(1, keepdims=True)
    return proba


# --------------------------------------------------------------------------- the automatic recipe's probe engine


def class_weights(labels, classes: int) -> np.ndarray:
    """scikit-learn's class_weight='balanced': n_samples / (n_classes * bincount(y)); a class with no rows
    gets weight 0 (it contributes nothing anyway)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=classes).astype(np.float64)
    present = int((counts > 0).sum())
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, counts.sum() / (max(present, 1) * counts), 0.0)
    return w.astype(np.float32)


def standardizer(X) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per feature (a constant feature gets std 1: it stays 0 after centring); float64 sums of
    float32 rows, without a float64 copy of X."""
    X = np.asarray(X, dtype=np.float32)
    mu = X.sum(0, dtype=np.float64) / max(len(X), 1)
    var = np.maximum(np.einsum("nd,nd->d", X, X, dtype=np.float64) / max(len(X), 1) - mu * mu, 0.0)
    sd = np.sqrt(var)
    return mu.astype(np.float32), np.where(sd > 1e-6 * np.maximum(np.abs(mu), 1.0), sd, 1.0).astype(np.float32)


def fold_standardizer(W: torch.Tensor, b: torch.Tensor, mu, sd) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer on standardised features as one on raw features: W (x - mu) / sd + b = (W / sd) x + b - (W / sd) mu."""
    import torch

    Wr = W / torch.as_tensor(sd)
    return Wr.contiguous(), (b - Wr @ torch.as_tensor(mu)).contiguous()


@dataclass
class ProbeRun:
    params: object  # recipe.ProbeParams
    fold: int  # -1: trained on every row
    weight: torch.Tensor  # (C, D) on raw features (the standardisation folded in), after the final epoch
    bias: torch.Tensor
    history: list[dict] = field(default_factory=list)  # per epoch (fold -1 with val given): losses, accuracies
    diverged: bool = False


def _probe_group(params: list, member: torch.Tensor, Z: torch.Tensor, y: torch.Tensor, classes: int,
                 row_weight: torch.Tensor, val=None):
    """Heads that share epochs, batch and seed, trained in lockstep on one shared row order: head h trains on
    the rows where member[:, h] (N,H bool) holds: the rows outside its fold, or a learning curve's share. In a
    batch a head sees only its rows (its gradient is their mean), and takes no step when it has none. The heads
    are stacked along the output axis, so every step is two plain matrix products of batch x D x (H*C).
    Returns W (H,C,D), b (H,C), history."""
    import torch

    p0, (N, D), H, C = params[0], Z.shape, len(params), classes
    B, E = p0.batch_size, p0.epochs
    W = torch.zeros(H * C, D)  # (H*C, D): G.T @ x below is 2-4x faster than x.T @ G into (D, H*C)
    b = torch.zeros(H * C)
    mW, mb = torch.zeros_like(W), torch.zeros_like(b)
    lr0 = torch.tensor([p.lr for p in params]).repeat_interleave(C)[:, None]
    wd = torch.tensor([p.weight_decay for p in params]).repeat_interleave(C)[:, None]
    mom = torch.tensor([p.momentum for p in params]).repeat_interleave(C)[:, None]
    eye = torch.eye(C)
    gen = torch.Generator().manual_seed(p0.seed)
    per_epoch = math.ceil(N / B)
    hist = []
    for epoch in range(E):
        perm = torch.randperm(N, generator=gen)
        loss_sum = torch.zeros(H)
        correct = torch.zeros(H)
        for k, s in enumerate(range(0, N, B)):
            idx = perm[s:s + B]
            x, yb = Z.index_select(0, idx), y[idx]  # index_select: 5x faster than Z[idx] here
            m = member.index_select(0, idx).float()  # (b,H) rows each head trains on
            cnt = m.sum(0)
            z = (x @ W.T + b).view(-1, H, C)
            logp = torch.log_softmax(z, -1)
            w = m * row_weight[idx][:, None]  # (b,H)
            loss_sum += -(logp.gather(2, yb[:, None, None].expand(-1, H, 1)).squeeze(2) * w).sum(0)
            correct += ((z.argmax(-1) == yb[:, None]).float() * m).sum(0)
            G = ((logp.exp() - eye[yb][:, None, :]) * (w / cnt.clamp(min=1))[..., None]).reshape(-1, H * C)
            gW = G.T @ x + wd * W
            gb = G.sum(0)
            step = epoch + k / per_epoch
            lr = lr0 * 0.5 * (1 + math.cos(math.pi * step / E))
            active = (cnt > 0).repeat_interleave(C)[:, None]  # a head with no rows here takes no step
            W, mW = sgd_momentum(W, mW, gW, lr, mom, active)  # weight decay is in gW, as torch's SGD adds it
            b, mb = sgd_momentum(b, mb, gb, lr[:, 0], mom[:, 0], active[:, 0])
        if val is not None:  # the history of the final head only (nothing chooses from it)
            n_rows = max(float(member[:, 0].sum()), 1.0)
            Wv, bv = W[:C], b[:C]
            vz = val[0] @ Wv.T + bv
            nll = torch.logsumexp(vz, 1) - vz.gather(1, val[1][:, None]).squeeze(1)
            vl = float(nll.mean()) if len(val[1]) else 0.0
            va = float((vz.argmax(1) == val[1]).float().mean()) if len(val[1]) else 0.0
            hist.append({"epoch": epoch, "lr": p0.lr_at(epoch), "train_loss": float(loss_sum[0]) / n_rows,
                         "train_acc": float(correct[0]) / n_rows, "val_loss": vl, "val_acc": va})
    return W.view(H, C, D), b.view(H, C), hist


def _probe_inputs(X, y, class_weight):
    """What every probe run starts from: X as float32 (checked finite), its standardisation (mean, std of all
    rows), the labels as a tensor and each row's loss weight (its class's weight, or 1)."""
    import torch

    X = np.asarray(X, dtype=np.float32)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if len(yt) == 0:
        raise PipelineError("the train split has no usable images")
    check_finite_features("train", torch.as_tensor(X))
    mu, sd = standardizer(X)
    rw = torch.ones(len(yt)) if class_weight is None else torch.as_tensor(class_weight)[yt]
    return X, mu, sd, yt, rw


def train_probes(X, y, classes: int, params: list, folds=None, val=None, class_weight=None
                 ) -> tuple[list[list[ProbeRun]], float]:
    """The automatic recipe's candidates, each on every fold (folds: fold id per row; None: one head per
    candidate on all rows), all trained at once (grouped by epochs, batch and seed). Standardisation uses
    the mean and std of all rows of X (no labels; every head's rows come from X only).
    val: optional (X, y) of the split reported on, for the history of all-rows heads; it changes nothing.
    class_weight: per-class weights of each row's loss (None: 1). Returns per candidate its runs in fold
    order (one run, fold -1, without folds) and the wall time in seconds."""
    import torch

    t0 = time.perf_counter()
    X, mu, sd, yt, rw = _probe_inputs(X, y, class_weight)
    fold_ids = np.full(len(yt), -2, dtype=np.int64) if folds is None else np.asarray(folds, dtype=np.int64)
    K = 0 if folds is None else int(fold_ids.max()) + 1
    head_folds = [-1] if folds is None else list(range(K))
    out: dict[tuple, ProbeRun] = {}
    with torch.inference_mode(), cpu_threads(1):  # see cpu_threads; measured on a busy 2-core CPU: a 208 x 1280 x 90
        #                                          product at 32 GFLOP/s on one thread, 2.5 on two
        Z = torch.as_tensor((X - mu) / sd)
        ft = torch.as_tensor(fold_ids)
        V = None
        if val is not None and folds is None:
            V = (torch.as_tensor((np.asarray(val[0], np.float32) - mu) / sd),
                 torch.as_tensor(np.asarray(val[1]), dtype=torch.long))
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.epochs, p.batch_size, p.seed), []).append(i)
        for idx in groups.values():
            heads = [(i, f) for i in idx for f in head_folds]
            member = ft[:, None] != torch.tensor([f for _, f in heads])[None, :]  # (N,H); fold -1: every row
            W, b, hist = _probe_group([params[i] for i, _ in heads], member, Z, yt, classes, rw,
                                      V if len(heads) == 1 else None)
            for h, (i, f) in enumerate(heads):
                Wr, br = fold_standardizer(W[h], b[h], mu, sd)
                bad = not (torch.isfinite(Wr).all() and torch.isfinite(br).all())
                out[(i, f)] = ProbeRun(params[i], f, Wr, br, hist, bad)
    return [[out[(i, f)] for f in head_folds] for i in range(len(params))], time.perf_counter() - t0


# --------------------------------------------------------------------------- one recipe on several row subsets


def train_probe_subsets(X, y, classes: int, p, member, class_weight=None) -> tuple[list, list]:
    """The probe recipe p trained on several row subsets at once (member (N,H) bool: head h's rows), in one
    shared row order; standardisation from all rows of X, as train_probes. Returns per head W (C,D) and b (C,)
    on raw features, as numpy arrays."""
    import torch

    X, mu, sd, yt, rw = _probe_inputs(X, y, class_weight)
    member = torch.as_tensor(np.asarray(member, dtype=bool))
    H = member.shape[1]
    with torch.inference_mode(), cpu_threads(1 if H * len(X) * X.shape[1] * classes <= 1 << 26 else None):
        W, b, _ = _probe_group([p] * H, member, torch.as_tensor((X - mu) / sd), yt, classes, rw)
        out = [fold_standardizer(W[h], b[h], mu, sd) for h in range(H)]
    return [w.numpy() for w, _ in out], [b_.numpy() for _, b_ in out]


def train_subsets(X, y, classes: int, p: HeadParams, rows: list, class_weight=None, views=None
                  ) -> tuple[list, list]:
    """The tutorial-family recipe p trained on each row subset alone (its own shuffle, batches and epochs; one
    of views (N,K,D) per row and epoch when given, as train_heads), all at once; the last epoch is kept.
    Returns per subset W (C,D) and b (C,) as numpy arrays."""
    import torch

    Xt = torch.as_tensor(np.asarray(X), dtype=torch.float32)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.long)
    check_finite_features("train", Xt)
    idx = [torch.as_tensor(np.asarray(r), dtype=torch.long) for r in rows]
    cw = None if class_weight is None else torch.as_tensor(class_weight)
    Vt = None if views is None else torch.as_tensor(np.asarray(views), dtype=torch.float32)
    big = len(idx) * max(len(r) for r in idx) * Xt.shape[1] * classes > 1 << 28  # e.g. 28 heads x 2,000 x 512 x 10
    with torch.inference_mode(), cpu_threads(None if big else 1):  # measured there: 1.31 s on 1 thread, 1.01 on 2
        trained = _train_rows_group([p] * len(idx), idx, None, Xt, yt, classes, cw=cw, views=Vt)
    return [r.last_weight.numpy() for r in trained], [r.last_bias.numpy() for r in trained]
