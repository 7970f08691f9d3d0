"""In-place row operations for losses that compute their logits gradient by hand.

A chunk of logits is ``[n, V]`` with ``V`` in the hundred thousands, so every temporary of
that shape costs as much as the chunk itself. These helpers overwrite their input instead
of allocating, reduce rows without materialising products, and hand out scratch buffers
that the chunks of one pass share.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_POOL: ContextVar[dict[str, Tensor] | None] = ContextVar("xtuner_loss_scratch", default=None)
#: the size of the row blocks that temporaries are limited to.
BLOCK_BYTES = 8 << 20


@contextmanager
def scratch_pool() -> Iterator[None]:
    """Within the block, :func:`scratch` reuses its buffers (one chunked pass)."""
    token = _POOL.set({})
    try:
        yield
    finally:
        _POOL.reset(token)


def scratch(key: str, like: Tensor) -> Tensor:
    """An uninitialised tensor shaped like ``like``, reused by every chunk of a pass.

    Within :func:`scratch_pool` the same key returns the same memory (sized by the first
    chunk, the largest), since fresh ``[chunk x V]`` allocations cost page faults on CPU;
    elsewhere a fresh tensor. Whatever the previous chunk left there must be overwritten, and
    a result that outlives the call must not stay in it.
    """
    pool = _POOL.get()
    if pool is None:
        return torch.empty_like(like)
    buf = pool.get(key)
    fits = (
        buf is not None
        and buf.shape[0] >= like.shape[0]
        and buf.shape[1:] == like.shape[1:]
        and buf.dtype == like.dtype
        and buf.device == like.device
    )
    if not fits:
        buf = pool[key] = torch.empty_like(like)
    return buf[: like.shape[0]]


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
    """Replaces each row of ``x`` by its log-softmax; temporaries stay under 8 MiB.

    Returns:
        ``[n]`` the log-sum-exp of each original row.
    """
    lse = x.new_empty(x.shape[0])
    rows = max(1, BLOCK_BYTES // max(1, x.shape[-1] * x.element_size()))
    for start in range(0, x.shape[0], rows):
        part = x[start : start + rows]
        torch.logsumexp(part, -1, out=lse[start : start + rows])
        part.sub_(lse[start : start + rows, None])
    return lse


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
