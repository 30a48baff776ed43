"""pipeline/optim.py is torch.optim.SGD + lr_scheduler.StepLR, to the bit, with the same state_dicts."""
import pytest
import torch
from torch import nn

from pipeline.optim import SGD, StepLR


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _steps(net, opt, sched, epochs: int, per_epoch: int = 3, seed: int = 1, lrs=None):
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for _ in range(per_epoch):
            x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        if lrs is not None:
            lrs.append(opt.param_groups[0]["lr"])
        sched.step()


@pytest.mark.parametrize("momentum,foreach", [(0.9, False), (0.0, False), (0.9, True), (0.0, True)])
def test_sgd_steplr_match_torch_to_the_bit(momentum, foreach):
    """foreach=True: the kernels torch (and we) use for CUDA tensors, checked here on the CPU."""
    a, b = _net(0), _net(0)
    oa = SGD(a.parameters(), lr=0.05, momentum=momentum, foreach=foreach)
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=momentum, foreach=foreach)
    sa, sb = StepLR(oa, 3, 0.1), torch.optim.lr_scheduler.StepLR(ob, 3, 0.1)
    la, lb = [], []
    _steps(a, oa, sa, 10, lrs=la)
    _steps(b, ob, sb, 10, lrs=lb)
    assert la == lb and la[0] == 0.05 and la[-1] != la[0]  # the chained lrs, float for float
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    da, db = oa.state_dict(), ob.state_dict()
    assert da["param_groups"] == db["param_groups"]
    assert da["state"].keys() == db["state"].keys()
    for i in da["state"]:
        assert torch.equal(da["state"][i]["momentum_buffer"], db["state"][i]["momentum_buffer"])
    assert sa.state_dict()["last_epoch"] == sb.state_dict()["last_epoch"]
    assert sa.get_last_lr() == sb.get_last_lr()


def test_state_dicts_move_between_torch_and_ours():
    """A checkpoint written with torch.optim (earlier versions) resumes here, and the other way round."""
    ref, ours = _net(0), _net(0)
    o_ref = torch.optim.SGD(ref.parameters(), lr=0.01, momentum=0.9)
    s_ref = torch.optim.lr_scheduler.StepLR(o_ref, 2, 0.5)
    _steps(ref, o_ref, s_ref, 3)
    ours.load_state_dict(ref.state_dict())
    o = SGD(ours.parameters(), lr=0.01, momentum=0.9)
    s = StepLR(o, 2, 0.5)
    o.load_state_dict(o_ref.state_dict())
    s.load_state_dict(s_ref.state_dict())
    _steps(ref, o_ref, s_ref, 3, seed=2)
    _steps(ours, o, s, 3, seed=2)
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), ours.parameters()))
    back = torch.optim.SGD(_net(0).parameters(), lr=1.0, momentum=0.9)
    back.load_state_dict(o.state_dict())
    back_s = torch.optim.lr_scheduler.StepLR(back, 2, 0.5)
    back_s.load_state_dict(s.state_dict())
    assert back.param_groups[0]["lr"] == o.param_groups[0]["lr"] and back_s.last_epoch == s.last_epoch


def test_a_state_dict_of_another_model_is_refused():
    o = SGD(_net(0).parameters(), lr=0.01, momentum=0.9)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.01, momentum=0.9)
    with pytest.raises(ValueError, match="does not match"):
        o.load_state_dict(other.state_dict())


def test_a_grad_scaler_steps_it_as_it_steps_torchs():
    """fp16 runs step through torch.amp.GradScaler (unscale, skip on inf): it only needs param_groups and
    step(). Checked with the CPU scaler, one step made infinite on purpose."""
    a, b = _net(0), _net(0)
    oa, ob = SGD(a.parameters(), lr=0.05, momentum=0.9), torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    sa, sb = torch.amp.GradScaler("cpu", init_scale=1024.0), torch.amp.GradScaler("cpu", init_scale=1024.0)
    g = torch.Generator().manual_seed(3)
    for step in range(6):
        x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
        for net, opt, scaler in ((a, oa, sa), (b, ob, sb)):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(net(x), y) * (float("inf") if step == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert sa.get_scale() == sb.get_scale() < 1024.0  # the infinite step was skipped and the scale halved
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
