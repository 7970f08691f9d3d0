"""The token mean of a loss over the shards of one sequence-parallel group, differentiable."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .setup_distributed import get_sequence_parallel_group


class _ReduceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean_loss: Tensor, num_tokens: Tensor, group) -> Tensor:
        n = num_tokens.to(device=mean_loss.device, dtype=torch.float64)
        # A shard without tokens may hold 0/0 = NaN: it contributes exactly 0.
        local_sum = torch.where(n > 0, mean_loss.detach().double() * n, torch.zeros_like(n))
        totals = torch.stack([local_sum, n])
        dist.all_reduce(totals, group=group)
        total, count = totals[0], totals[1]
        share = torch.where(count > 0, n / count.clamp_min(1e-12), torch.zeros_like(n))
        ctx.save_for_backward(share.to(mean_loss.dtype))
        mean = torch.where(count > 0, total / count.clamp_min(1e-12), torch.zeros_like(total))
        return mean.to(mean_loss.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (share,) = ctx.saved_tensors
        return grad * share, None, None


def reduce_sequence_parallel_loss(
    mean_loss: Tensor, loss_scale: Tensor | int, sp_group=None
) -> Tensor:
    """The token mean over the group from each shard's mean and token count.

    Forward: ``L = sum_r n_r * m_r / N`` with ``N = sum_r n_r`` (every rank gets ``L``; a
    shard with ``n_r = 0`` contributes 0 even if its mean is NaN; ``L = 0`` when ``N = 0``).
    Backward: ``dL/dm_r = n_r / N`` on each rank, the true derivative, so the gradients of
    all shards together are those of ``L`` itself (upstream XTuner's backward was the
    identity: an unweighted sum of per-shard means).

    Note that data-parallel gradient averaging (DDP, DeepSpeed) also divides by the
    sequence-parallel ranks, which all hold parts of the same sequences: to get the gradient a
    single process would compute, multiply the loss you backpropagate by the
    sequence-parallel size. XTuner's own loss path
    (:func:`xtuner.model.losses.finalize_loss`) does that for you.

    Args:
        mean_loss: this shard's mean loss (a scalar).
        loss_scale: this shard's number of tokens in that mean (tensor or int).
        sp_group: the sequence-parallel group (the current one when None).
    """
    group = sp_group if sp_group is not None else get_sequence_parallel_group()
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return mean_loss
    count = torch.as_tensor(loss_scale, device=mean_loss.device)
    return _ReduceLoss.apply(mean_loss, count, group)
