"""Small collective helpers used by losses and loops (no-ops in a single process)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from .sequence.setup_distributed import (
    get_sequence_parallel_group,
    get_sequence_parallel_world_size,
)


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Sum of a detached tensor over ``group`` (the whole world when None)."""
    if not dist.is_initialized():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def sp_all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of a detached tensor over this rank's sequence-parallel group."""
    if get_sequence_parallel_world_size() == 1:
        return tensor.detach()
    return all_reduce_sum(tensor, get_sequence_parallel_group())


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
