import numpy as np
import pytest
import torch
from torch import nn

from pipeline import PipelineError
from pipeline.head import HeadParams, expand_grid, init_linear, train_heads


def toy(n=30, d=16, c=3, seed=0):
    g = np.random.default_rng(seed)
    y = g.integers(0, c, n)
    centers = g.normal(0, 1, (c, d))
    X = (centers[y] + g.normal(0, 0.8, (n, d))).astype(np.float32)
    return X, y.astype(np.int64)


def autograd_reference(X, y, p: HeadParams, classes: int, views=None):
    """The tutorial's loop: nn.Linear, CrossEntropyLoss, SGD(momentum), StepLR stepped per epoch."""
    X, y = torch.tensor(X), torch.tensor(y)
    lin = nn.Linear(X.shape[1], classes)
    W, b = init_linear(X.shape[1], classes, p.seed)
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(b)
    opt = torch.optim.SGD(lin.parameters(), lr=p.lr, momentum=p.momentum)
    sched = torch.optim.lr_scheduler.StepLR(opt, p.step_size, p.gamma)
    gen = torch.Generator().manual_seed(p.seed)
    for _ in range(p.epochs):
        perm = torch.randperm(len(y), generator=gen)
        Xe = X
        if views is not None:
            pick = torch.randint(views.shape[1], (len(y),), generator=gen)
            Xe = torch.tensor(views)[torch.arange(len(y)), pick]
        for s in range(0, len(y), p.batch_size):
            i = perm[s:s + p.batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(lin(Xe[i]), y[i]).backward()
            opt.step()
        sched.step()
    return lin.weight.detach(), lin.bias.detach()


@pytest.mark.parametrize("p", [HeadParams(epochs=9), HeadParams(epochs=5, lr=0.01, momentum=0.5, step_size=2,
                                                                  gamma=0.5, batch_size=7, seed=3)])
def test_head_equals_autograd_sgd_steplr(p):
    X, y = toy()
    (r,), _ = train_heads((X, y), (X[:10], y[:10]), 3, [p])
    W, b = autograd_reference(X, y, p, 3)
    torch.testing.assert_close(r.last_weight, W, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.last_bias, b, rtol=1e-5, atol=1e-6)
    assert len(r.history) == p.epochs
    assert [h["lr"] for h in r.history][:3] == [p.lr_at(e) for e in range(3)]


def test_views_match_reference_draws():
    X, y = toy(n=12)
    views = np.stack([X + 0.1 * k for k in range(3)], axis=1)  # (N, 3, D)
    p = HeadParams(epochs=4, seed=5)
    (r,), _ = train_heads((X, y), (X, y), 3, [p], views=views)
    W, b = autograd_reference(X, y, p, 3, views=views)
    torch.testing.assert_close(r.last_weight, W, rtol=1e-5, atol=1e-6)


def test_best_epoch_weights_and_history():
    X, y = toy(n=40, seed=1)
    (r,), _ = train_heads((X[:30], y[:30]), (X[30:], y[30:]), 3, [HeadParams(epochs=12, lr=0.05)])
    accs = [h["val_acc"] for h in r.history]
    assert r.best_epoch == int(np.argmax(accs))  # first of the best
    assert r.best_val_acc == pytest.approx(max(accs))
    logits = torch.tensor(X[30:]) @ r.weight.T + r.bias
    assert (logits.argmax(1).numpy() == y[30:]).mean() == pytest.approx(r.best_val_acc)
    assert set(r.history[0]) == {"epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc"}


def test_sweep_equals_separate_runs():
    X, y = toy()
    grid = expand_grid({"lr": [0.001, 0.01], "seed": [0, 1], "batch_size": [4, 5], "epochs": [3]})
    assert len(grid) == 8
    together, _ = train_heads((X, y), (X, y), 3, grid)
    for p, r in zip(grid, together):
        (alone,), _ = train_heads((X, y), (X, y), 3, [p])
        torch.testing.assert_close(r.last_weight, alone.last_weight, rtol=1e-5, atol=1e-6)
        assert r.best_epoch == alone.best_epoch
        assert [h["val_acc"] for h in r.history] == pytest.approx([h["val_acc"] for h in alone.history])


def test_bad_grid_and_empty_train():
    with pytest.raises(PipelineError, match="epochs, batch size and step size must be >= 1"):
        expand_grid({"batch_size": [0]})
    X, y = toy()
    with pytest.raises(PipelineError, match="no usable images"):
        train_heads((X[:0], y[:0]), (X, y), 3, [HeadParams()])


def test_a_small_head_trains_on_one_thread_with_the_same_result(small_cache, tmp_path):
    import torch

    from pipeline.head import expand_grid, train_heads
    from pipeline.head import cpu_threads
    from pipeline.train_head import HeadConfig, run_train_head
    from cache import read_cache

    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    m = run_train_head(HeadConfig(cache=str(small_cache), out=str(tmp_path / "h"), epochs=(3,), plots=False))
    assert torch.get_num_threads() == before
    c = read_cache(small_cache)
    tr, va = c.splits["train"], c.splits["val"]
    (ref,), _ = train_heads((tr.features, tr.labels), (va.features, va.labels), 2, expand_grid({"epochs": [3]}))
    assert m["history"] == ref.history and m["best_epoch"] == ref.best_epoch

