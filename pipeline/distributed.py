"""torchrun support: process-group setup and the few collectives the stages need.

Under torchrun (WORLD_SIZE > 1) the group is NCCL on GPUs and gloo on CPUs; otherwise every helper is
a no-op for a single process, so the stages have one code path.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import PipelineError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        """rank 0's obj on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64 on the CPU side of gloo/NCCL)."""
        if not self.enabled:
            return values
        dev = torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        dist.all_reduce(t)
        return t.cpu().tolist()

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share [lo, hi) of n rows."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world


def init_distributed(device: str = "auto") -> Dist:
    """Join the torchrun process group when there is one (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        # NCCL wants one GPU per process; more processes than GPUs on a node (e.g. 2 on 1) run over gloo
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        backend = "nccl" if use_cuda and local_world <= torch.cuda.device_count() else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        except Exception as e:
            raise PipelineError(f"cannot join the torchrun process group: {type(e).__name__}: {e}") from None
    return Dist(rank, world, local_rank)


def rank_device(device: str, d: Dist) -> str:
    """Each rank uses its own GPU (cuda:LOCAL_RANK) when running on CUDA."""
    if not d.enabled:
        return device
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{d.local_rank % torch.cuda.device_count()}"
    return device


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
