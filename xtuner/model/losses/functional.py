"""In-place row operations for losses that compute their logits gradient by hand.

A chunk of logits is ``[n, V]`` with ``V`` in the hundred thousands, so every temporary of
that shape costs as much as the chunk itself. These helpers overwrite their input instead
of allocating, reduce rows without materialising products, and hand out scratch buffers
that the chunks of one pass share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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


def vocab_major(device: torch.device) -> bool:
    """Whether chunk logits are stored vocabulary-major on ``device``.

    A chunk is always seen as ``[n, V]``. On a CPU it is stored as ``[V, n]`` (the view is
    its transpose): ``W @ h.T`` into that layout is 15-20% faster with MKL than ``h @ W.T``
    into ``[n, V]``, the head gradient's ``addmm`` reads it contiguously, and the row
    reductions below cost the same in either layout. Elsewhere rows are contiguous.
    """
    return device.type == "cpu"


def is_vocab_major(x: Tensor) -> bool:
    """Whether a 2-D ``[n, V]`` tensor is the transpose of a contiguous ``[V, n]`` one."""
    return x.dim() == 2 and x.shape[0] > 1 and x.t().is_contiguous()


def logits_view(flat: Tensor, rows: int, vocab: int, major: bool) -> Tensor:
    """An ``[rows, vocab]`` view of the start of a flat buffer, in either layout."""
    if major:
        return flat[: rows * vocab].view(vocab, rows).t()
    return flat[: rows * vocab].view(rows, vocab)


def linear_into(hidden: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> Tensor:
    """``hidden @ weight.T (+ bias)`` written into ``out`` ``[n, V]``, whatever its layout.

    The bias is added inside the GEMM (``addmm``), before its result is rounded to a 16-bit
    ``out``, as ``F.linear`` does.
    """
    if is_vocab_major(out):
        if bias is None:
            torch.mm(weight, hidden.t(), out=out.t())
        else:
            torch.addmm(bias[:, None], weight, hidden.t(), out=out.t())
    elif bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)
    return out


def scratch(key: str, like: Tensor) -> Tensor:
    """An uninitialised tensor shaped and laid out like ``like``, reused by every chunk.

    Within :func:`scratch_pool` the same key returns the same memory (sized by the first
    chunk, the largest), since fresh ``[chunk x V]`` allocations cost page faults on CPU;
    elsewhere a fresh tensor. Whatever the previous chunk left there must be overwritten, and
    a result that outlives the call must not stay in it.
    """
    pool = _POOL.get()
    major = is_vocab_major(like)
    if pool is None or like.dim() != 2 or not (major or like.is_contiguous()):
        return torch.empty_like(like)
    flat = pool.get(key)
    if (
        flat is None
        or flat.numel() < like.numel()
        or flat.dtype != like.dtype
        or flat.device != like.device
    ):
        flat = pool[key] = like.new_empty(like.numel())
    return logits_view(flat, like.shape[0], like.shape[1], major)


def _block_sums(x: Tensor, block: Callable[[slice, Tensor, Tensor], Tensor]) -> Tensor:
    """``sum_v block(columns, t1, t2)[i, v]`` for each row of ``x`` ``[n, V]``.

    Columns are taken a block at a time, so temporaries stay under 2 x 8 MiB, and under a
    quarter of ``x`` for small chunks, in either layout. ``block`` gets the column slice
    and two scratch blocks of its width, and returns the block to sum (usually one of them,
    written in place).
    """
    n, vocab = x.shape
    cols = min(max(1, BLOCK_BYTES // max(1, n * x.element_size())), max(1, -(-vocab // 8)))
    like = x[:, :cols]
    t1, t2 = torch.empty_like(like), torch.empty_like(like)
    total = x.new_zeros(n)
    for start in range(0, vocab, cols):
        stop = min(start + cols, vocab)
        width = stop - start
        total += block(slice(start, stop), t1[:, :width], t2[:, :width]).sum(-1)
    return total


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


def sum_exp(x: Tensor) -> Tensor:
    """``sum_v exp(x[i, v])`` for each row, with block-sized temporaries."""
    return _block_sums(x, lambda cols, t1, _: torch.exp(x[:, cols], out=t1))


def log_softmax_(x: Tensor) -> Tensor:
    """Replaces each row of ``x`` by its log-softmax; temporaries stay under 16 MiB.

    (``torch.logsumexp`` is 6-10x slower than this on a CPU for vocabulary-sized rows.)

    Returns:
        ``[n]`` the log-sum-exp of each original row.
    """
    top = x.amax(-1, keepdim=True)
    x.sub_(top)
    log_total = sum_exp(x).log_()
    x.sub_(log_total[:, None])
    return top.squeeze(-1) + log_total


def row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum_v a[i, v] * b[i, v]`` for each row, without a temporary ``a * b``."""
    return _block_sums(a, lambda cols, t1, _: torch.mul(a[:, cols], b[:, cols], out=t1))


def kl_rows(log_q: Tensor, log_p: Tensor) -> Tensor:
    """``KL(Q || P) = sum_v Q_v (log Q_v - log P_v)`` per row, from two log-softmaxes."""

    def block(cols: slice, t1: Tensor, t2: Tensor) -> Tensor:
        torch.exp(log_q[:, cols], out=t1)
        return t1.mul_(torch.sub(log_q[:, cols], log_p[:, cols], out=t2))

    return _block_sums(log_q, block)


def target_grad_(probs: Tensor, targets: Tensor, scale: Tensor) -> Tensor:
    """Turns probabilities into ``scale_i * (p_i - onehot(y_i))`` in place.

    This is the gradient w.r.t. the logits of any loss ``f(log p_y)`` with
    ``scale = -f'(log p_y)`` (cross-entropy: 1).
    """
    probs.mul_(scale[:, None])
    probs.scatter_add_(1, targets[:, None], -scale[:, None])
    return probs
