"""Small collective helpers used by losses and loops (no-ops in a single process)."""

from __future__ import annotations

import torch
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


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over a group; backward sums the gradients over the group too.

    Every rank computes the same loss from the sum, so the gradient with respect to its
    own part is the sum of every rank's output gradient (the adjoint of an all-reduce).
    """

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sp_all_reduce_sum_with_grad(tensor: Tensor) -> Tensor:
    """Differentiable sum over this rank's sequence-parallel group (e.g. of per-sequence
    sums whose tokens are spread over the shards); the identity without sequence parallel."""
    if get_sequence_parallel_world_size() == 1 or not dist.is_initialized():
        return tensor
    return _AllReduceSumWithGrad.apply(tensor, get_sequence_parallel_group())
