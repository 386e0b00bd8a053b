"""Process-group set-up from torchrun's environment: NCCL on GPU, gloo on CPU, rank-0 helpers."""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as td

from .config import config_error


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            td.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few scalars over ranks (float64 on the process device)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            td.all_reduce(t)
        return t.tolist()


def init_distributed(device: str = "auto") -> DistEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (set by torchrun) and join the process group if world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise config_error("device", "'cuda' requested but no CUDA device is available; accepted: auto, cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not td.is_initialized():
        td.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30),
                              **({"device_id": dev} if use_cuda else {}))
    return DistEnv(rank, local_rank, world, dev)


def shutdown_distributed() -> None:
    if td.is_initialized():
        td.destroy_process_group()
