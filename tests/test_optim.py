"""finetune steps torch.optim.SGD + StepLR; checkpoints written while it owned a copy of them still resume; the
head engines' own momentum step (pipeline.head.sgd_momentum) equals torch's SGD."""
import pytest
import torch
from torch import nn

from pipeline.finetune import check_optimizer_state


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))


def _owned_sgd_state(net: nn.Module, lr: float) -> dict:
    """The optimizer state_dict the earlier owned SGD wrote (its keys, spelled out here), buffers of ones."""
    group = {"lr": lr, "momentum": 0.9, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False,
             "foreach": None, "differentiable": False, "fused": None, "initial_lr": 0.01}
    params = list(net.parameters())
    group["params"] = list(range(len(params)))
    return {"state": {i: {"momentum_buffer": torch.ones_like(p)} for i, p in enumerate(params)},
            "param_groups": [group]}


def test_an_older_checkpoints_optimizer_state_resumes_in_torch_optim():
    net = _net(0)
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    sd = _owned_sgd_state(net, lr=0.001)
    check_optimizer_state(sd, params)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.001  # the checkpoint's lr, not the constructor's
    opt.zero_grad()
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: buf = 0.9 * 1 + 0 = 0.9, p -= 0.001 * 0.9
    for p, b in zip(params, before):
        assert torch.allclose(p, b - 0.0009, atol=1e-7)


@pytest.mark.parametrize("crafted", [
    lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(3)),  # fits no parameter
    lambda sd: sd["state"].update({99: {"momentum_buffer": torch.zeros(1)}}),  # no such parameter
    lambda sd: sd["param_groups"][0].update(params=[0, 1]),  # another model's group
    lambda sd: sd["state"][1].update(momentum_buffer="not a tensor"),
])
def test_an_optimizer_state_that_does_not_fit_is_refused_before_any_step(crafted):
    net = _net(0)
    sd = _owned_sgd_state(net, lr=0.001)
    crafted(sd)
    with pytest.raises(ValueError):
        check_optimizer_state(sd, list(net.parameters()))


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 0.0), (0.5, 0.01), (0.0, 0.0)])
def test_sgd_momentum_is_torch_sgd(momentum, weight_decay):
    """The head engines' own step (they train many heads stacked, without optimizer objects) equals torch's SGD;
    weight decay goes into the gradient as torch adds it; a head masked off takes no step at all."""
    from pipeline.head import sgd_momentum

    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(2, 3, 5, generator=g)
    grads = [torch.randn(2, 3, 5, generator=g) for _ in range(6)]
    p = w0.clone().requires_grad_()
    opt = torch.optim.SGD([p], lr=0.05, momentum=momentum, weight_decay=weight_decay)
    w, buf = w0.clone(), torch.zeros_like(w0)
    for grad, lr in zip(grads, [0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005]):  # a schedule changes lr between steps
        opt.param_groups[0]["lr"] = lr
        p.grad = grad.clone()
        opt.step()
        w, buf = sgd_momentum(w, buf, grad + weight_decay * w, lr, momentum)
    torch.testing.assert_close(w, p.detach(), rtol=1e-6, atol=1e-7)
    active = torch.tensor([True, False])[:, None, None]
    w2, buf2 = sgd_momentum(w, buf, grads[0], 0.05, momentum, active)
    assert torch.equal(w2[1], w[1]) and torch.equal(buf2[1], buf[1]) and not torch.equal(w2[0], w[0])
