"""Data-parallel training under ``torchrun --nproc_per_node=N`` (gloo on CPU, nccl on GPU).

Each rank samples its own batches; gradients are averaged with an all-reduce after ``backward``, which
is what DistributedDataParallel does, without wrapping the policy (its losses are methods, not
``forward``). Rank 0 alone collects demos, writes checkpoints and logs, and evaluates.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int]:
    """Initialise the process group when launched by torchrun; returns ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def average_gradients(params) -> None:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


def broadcast_parameters(module: torch.nn.Module) -> None:
    """Start every rank from rank 0's weights."""
    if dist.is_initialized():
        for t in module.state_dict().values():
            dist.broadcast(t, src=0)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
