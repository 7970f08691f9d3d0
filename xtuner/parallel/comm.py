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


def token_weighted_mean(values: dict, sp_size: int = 1) -> dict:
    """Logged values of every rank's micro-batch, as one process would log the global batch.

    Each value (a scalar: the loss terms, the accuracy) is averaged over the ranks weighted
    by the rank's ``num_tokens``; ``num_tokens`` becomes the global count (the ranks of one
    sequence-parallel group of ``sp_size`` share their tokens and count them once). Without
    ``num_tokens``, or in one process, the values are returned unchanged.
    """
    if world_size() == 1 or "num_tokens" not in values:
        return values
    tokens = torch.as_tensor(values["num_tokens"], dtype=torch.float64).detach().cpu()
    keys = [k for k in values if k != "num_tokens"]
    local = torch.stack(
        [torch.as_tensor(values[k], dtype=torch.float64).detach().cpu() * tokens for k in keys]
        + [tokens]
    )
    if dist.get_backend() == "nccl":
        local = local.cuda()
    total = all_reduce_sum(local).cpu()
    out = dict(values)
    count = total[-1]
    for i, key in enumerate(keys):
        out[key] = (total[i] / count.clamp_min(1)).float()
    out["num_tokens"] = (count / sp_size).float()
    return out


def nonfinite_ranks(values: Tensor) -> list[list[int]]:
    """For each of the ``n`` values on this rank, the ranks where that value is NaN or Inf.

    Every rank gets the same answer (one all-reduce), so a decision taken on it (raise, or
    skip a loss term) is the same on every rank. In one process: ``[[0]]`` or ``[]`` each.
    """
    bad = ~values.detach().float().isfinite()
    if not dist.is_initialized():
        return [[0] if b else [] for b in bad.tolist()]
    table = torch.zeros(world_size(), bad.numel(), dtype=torch.int32)
    table[dist.get_rank()] = bad.cpu().to(torch.int32)
    if dist.get_backend() == "nccl":
        table = table.cuda()
    table = all_reduce_sum(table).cpu()
    return [table[:, i].nonzero().flatten().tolist() for i in range(bad.numel())]
