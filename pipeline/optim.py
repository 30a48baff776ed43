"""The tutorial's optimiser and schedule for finetune: torch.optim.SGD(lr, momentum) and
lr_scheduler.StepLR(step_size, gamma), written out, with torch's state_dict layouts (checkpoints move
between the two either way).

Why not torch.optim itself: every torch.optim optimizer imports torch._dynamo the first time one is built
or stepped (2.5-4 s on a 2-core CPU, a third of finetune's time outside its epochs). The update is
torch's, op for op: its single-tensor loop on the CPU and its foreach kernels on CUDA, the devices torch
picks them for, so the weights match torch.optim to the bit (tests/test_optim.py, on the CPU).
"""
from __future__ import annotations

import torch


class SGD:
    """torch.optim.SGD(params, lr=lr, momentum=momentum): no dampening, weight decay or Nesterov."""

    def __init__(self, params, lr: float, momentum: float = 0.0, foreach: bool | None = None):
        self.params = list(params)
        if not self.params:
            raise ValueError("optimizer got an empty parameter list")
        # one group, the keys torch writes (GradScaler and the scheduler read group["params"] and group["lr"])
        self.param_groups = [{"params": self.params, "lr": lr, "momentum": momentum, "dampening": 0,
                              "weight_decay": 0, "nesterov": False, "maximize": False, "foreach": foreach,
                              "differentiable": False, "fused": None, "initial_lr": lr}]
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, momentum = group["lr"], group["momentum"]
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not live:
            return
        params = [self.params[i] for i in live]
        grads = [p.grad for p in params]
        foreach = group["foreach"]  # None: torch's default, the foreach kernels for CUDA tensors
        foreach = params[0].device.type == "cuda" if foreach is None else foreach
        if momentum != 0:
            bufs = [self.buffers[i] for i in live]
            if all(b is not None for b in bufs) and foreach:
                torch._foreach_mul_(bufs, momentum)  # torch's default on CUDA: the foreach kernels
                torch._foreach_add_(bufs, grads, alpha=1)
            else:
                for k, (i, g) in enumerate(zip(live, grads)):
                    if bufs[k] is None:  # the first step: the buffer is the gradient itself
                        bufs[k] = self.buffers[i] = torch.clone(g).detach()
                    else:
                        bufs[k].mul_(momentum).add_(g, alpha=1)
            grads = bufs
        if foreach:
            torch._foreach_add_(params, grads, alpha=-lr)
        else:
            for p, g in zip(params, grads):
                p.add_(g, alpha=-lr)

    def state_dict(self) -> dict:
        """torch.optim.SGD's layout: {"state": {index: {"momentum_buffer": t}}, "param_groups": [...]}."""
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        state = {i: {"momentum_buffer": b} for i, b in enumerate(self.buffers) if b is not None}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, sd: dict) -> None:
        groups = sd.get("param_groups") or []
        if len(groups) != 1 or len(groups[0].get("params", [])) != len(self.params):
            raise ValueError("the optimizer state does not match this model's parameters")
        self.param_groups[0].update({k: v for k, v in groups[0].items() if k != "params"})
        self.buffers = [None] * len(self.params)
        for i, st in sd.get("state", {}).items():
            buf = st.get("momentum_buffer")
            if buf is not None:
                p = self.params[int(i)]
                if buf.shape != p.shape:
                    raise ValueError(f"momentum buffer {i} has shape {tuple(buf.shape)}, not {tuple(p.shape)}")
                self.buffers[int(i)] = buf.to(dtype=p.dtype, device=p.device, copy=True)  # never shared


class StepLR:
    """lr_scheduler.StepLR: after every step_size epochs the lr is multiplied by gamma (chained, as torch
    does, so the float rounding is the same)."""

    def __init__(self, optimizer: SGD, step_size: int, gamma: float):
        self.optimizer, self.step_size, self.gamma = optimizer, step_size, gamma
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = 0
        self._last_lr = [g["lr"] for g in optimizer.param_groups]

    def step(self) -> None:
        self.last_epoch += 1
        if self.last_epoch % self.step_size == 0:
            for g in self.optimizer.param_groups:
                g["lr"] = g["lr"] * self.gamma
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict:
        return {"step_size": self.step_size, "gamma": self.gamma, "base_lrs": list(self.base_lrs),
                "last_epoch": self.last_epoch, "_step_count": self.last_epoch + 1, "_is_initial": False,
                "_get_lr_called_within_step": False, "_last_lr": list(self._last_lr)}

    def load_state_dict(self, sd: dict) -> None:
        self.step_size, self.gamma = sd["step_size"], sd["gamma"]
        self.base_lrs, self.last_epoch, self._last_lr = list(sd["base_lrs"]), sd["last_epoch"], list(sd["_last_lr"])
