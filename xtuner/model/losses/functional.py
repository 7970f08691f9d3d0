"""In-place row operations for losses that compute their logits gradient by hand.

A chunk of logits is ``[n, V]`` with ``V`` in the hundred thousands, so every temporary of
that shape costs as much as the chunk itself. These helpers overwrite their input instead
of allocating, and reduce rows without materialising products.
"""

from __future__ import annotations

import torch
from torch import Tensor


def softmax_(x: Tensor) -> Tensor:
    """Replaces each row of ``x`` by its softmax, without a temporary row block.

    Returns:
        ``[n]`` the log-sum-exp of each original row.
    """
    top = x.amax(-1, keepdim=True)
    x.sub_(top).exp_()
    total = x.sum(-1, keepdim=True)
    x.div_(total)
    return (top + total.log()).squeeze(-1)


def log_softmax_(x: Tensor) -> Tensor:
    """Replaces each row of ``x`` by its log-softmax (one temporary row block meanwhile).

    Returns:
        ``[n]`` the log-sum-exp of each original row.
    """
    lse = torch.logsumexp(x, -1, keepdim=True)
    x.sub_(lse)
    return lse.squeeze(-1)


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_v a[i, v] * b[i, v]`` for each row, without a temporary ``a * b``."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def target_grad_(probs: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """Turns probabilities into ``scale_i * (p_i - onehot(y_i))`` in place.

    This is the gradient w.r.t. the logits of any loss ``f(log p_y)`` with
    ``scale = -f'(log p_y)`` (cross-entropy: 1).
    """
    probs.mul_(scale[:, None])
    probs.scatter_add_(1, targets[:, None], -scale[:, None])
    return probs
