"""Collectives along the sequence-parallel group, with the autograd rules Ulysses needs.

All functions take the group explicitly (upstream signatures) and are the identity for a
group of one rank or when ``torch.distributed`` is not initialised.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .data_collate import split_batch_for_sequence_parallel
from .setup_distributed import get_sequence_parallel_group


def _group_size(group) -> int:
    # No group means sequence parallel is not set up: nothing to communicate.
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _all_to_all(x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
    size = _group_size(group)
    if size == 1:
        return x
    inputs = [t.contiguous() for t in torch.tensor_split(x, size, dim=scatter_dim)]
    outputs = [torch.empty_like(t) for t in inputs]
    dist.all_to_all(outputs, inputs, group=group)
    return torch.cat(outputs, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # The adjoint of an all-to-all is the all-to-all with the two dims swapped.
        return _all_to_all(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def all_to_all(x: Tensor, sp_group=None, scatter_dim: int = 2, gather_dim: int = 1) -> Tensor:
    """Scatters ``scatter_dim`` over the group and gathers ``gather_dim`` (differentiable).

    With ``x`` of shape ``[B, S/sp, H, D]`` on each rank, the defaults give ``[B, S, H/sp, D]``:
    rank ``r`` receives head chunk ``r`` of every rank's sequence shard, in rank order.

    Args:
        x: the local tensor; ``scatter_dim`` must divide by the group size.
        sp_group: the process group (the sequence-parallel group when None).
        scatter_dim: the dimension split across ranks.
        gather_dim: the dimension the received chunks are concatenated along.
    """
    group = sp_group if sp_group is not None else get_sequence_parallel_group()
    if _group_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def _split(x: Tensor, dim: int, group) -> Tensor:
    size = _group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(
            f"cannot split dim {dim} of size {x.shape[dim]} evenly over {size} ranks: "
            "pad it first (pad_for_sequence_parallel)"
        )
    return x.chunk(size, dim=dim)[dist.get_rank(group)].contiguous()


def gather_for_sequence_parallel(x: Tensor, dim: int, sp_group=None) -> Tensor:
    """Concatenates every rank's ``x`` along ``dim`` in rank order (not differentiable)."""
    group = sp_group if sp_group is not None else get_sequence_parallel_group()
    size = _group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def split_for_sequence_parallel(*args: Any, **kwargs: Any):
    """Keeps this rank's shard. Two forms:

    * ``split_for_sequence_parallel(input, dim, sp_group)`` (upstream): this rank's chunk of
      ``dim`` of a tensor (not differentiable through the other chunks).
    * ``split_for_sequence_parallel(inputs, labels, weights, extras)``: the model-side split of
      a whole batch whose labels are already shifted; see
      :func:`~xtuner.parallel.sequence.data_collate.split_batch_for_sequence_parallel`.
    """
    first = args[0] if args else kwargs.get("input")
    if isinstance(first, Tensor):
        return _split_tensor(*args, **kwargs)
    return split_batch_for_sequence_parallel(*args, **kwargs)


def _split_tensor(input: Tensor, dim: int, sp_group=None) -> Tensor:
    group = sp_group if sp_group is not None else get_sequence_parallel_group()
    return _split(input, dim, group)


def _scaled(grad: Tensor, group, grad_scale: str | None) -> Tensor:
    if grad_scale == "up":
        return grad * _group_size(group)
    if grad_scale == "down":
        return grad / _group_size(group)
    if grad_scale is not None:
        raise ValueError(f"grad_scale must be 'up', 'down' or None, got {grad_scale!r}")
    return grad


class _SplitForwardGatherBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group, grad_scale: str | None) -> Tensor:
        ctx.dim, ctx.group, ctx.grad_scale = dim, group, grad_scale
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = _scaled(grad, ctx.group, ctx.grad_scale)
        return gather_for_sequence_parallel(grad, ctx.dim, ctx.group), None, None, None


class _GatherForwardSplitBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group, grad_scale: str | None) -> Tensor:
        ctx.dim, ctx.group, ctx.grad_scale = dim, group, grad_scale
        return gather_for_sequence_parallel(x, dim, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = _scaled(grad, ctx.group, ctx.grad_scale)
        return _split(grad, ctx.dim, ctx.group), None, None, None


def split_forward_gather_backward(
    input: Tensor, dim: int, sp_group=None, grad_scale: str | None = None
) -> Tensor:
    """Forward: this rank's chunk of ``dim``. Backward: the gradients of all chunks gathered
    (so each rank receives the full-size gradient), scaled by the group size when
    ``grad_scale`` is ``'up'`` or divided by it when ``'down'``."""
    group = sp_group if sp_group is not None else get_sequence_parallel_group()
    if _group_size(group) == 1:
        return input
    return _SplitForwardGatherBackward.apply(input, dim, group, grad_scale)


def gather_forward_split_backward(
    input: Tensor, dim: int, sp_group=None, grad_scale: str | None = None
) -> Tensor:
    """Forward: every rank's ``input`` concatenated along ``dim``. Backward: only this
    rank's chunk of the gradient (``grad_scale`` as in :func:`split_forward_gather_backward`).
    """
    group = sp_group if sp_group is not None else get_sequence_parallel_group()
    if _group_size(group) == 1:
        return input
    return _GatherForwardSplitBackward.apply(input, dim, group, grad_scale)
