"""Data-parallel runs (torchrun): who this process is, and the collectives the engine needs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> DistInfo:
        # torchrun sets these; a plain `python -m services.train.worker` has none of them.
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def all_reduce(t: torch.Tensor, dist: DistInfo) -> torch.Tensor:
    """Sum ``t`` over the ranks, in place (a no-op in a single process)."""
    if dist.enabled:
        torch.distributed.all_reduce(t)
    return t


def broadcast_int(value: int, dist: DistInfo) -> int:
    """Rank 0's ``value`` on every rank."""
    if not dist.enabled:
        return value
    # NCCL only moves CUDA tensors; gloo takes CPU ones.
    device = f"cuda:{dist.local_rank}" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([value], device=device)
    torch.distributed.broadcast(t, src=0)
    return int(t)
