"""PyTorch's own distributed engine: the same `tumorseg train` under `torchrun` uses DDP.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them training is single-process.
NCCL on GPUs, gloo on the CPU. Only rank 0 logs and writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..devices import resolve_device


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(preference: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun; otherwise a single-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, device)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks (a no-op when not distributed)."""
    if ctx.distributed:
        values = values.to(ctx.device)
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def gather_lists(items: list, ctx: DistContext) -> list:
    """Concatenate a list from every rank (picklable items; used for small validation outputs)."""
    if not ctx.distributed:
        return items
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
