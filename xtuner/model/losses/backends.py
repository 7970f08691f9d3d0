"""Optional fused linear cross-entropy kernels of other projects, for :class:`CrossEntropyLoss`.

``backend='chunked'`` (the default) is this fork's own chunked path, on every device.
``'liger'`` uses Liger Kernel's ``liger_fused_linear_cross_entropy`` and ``'cce'`` Apple's
Cut Cross-Entropy ``linear_cross_entropy``: Triton kernels that need CUDA tensors and their
package installed. ``'auto'`` takes the first of liger, cce that is installed and supports
the loss's options when the batch is on a GPU, and the chunked path otherwise.

The kernels get the valid tokens only, so their ``ignore_index`` never matters; the
per-token weights of the contract (``loss_weight``, sample reductions, class weights) are
applied here: an unweighted batch asks the kernel for ``reduction='sum'``, a weighted one
for ``reduction='none'`` and sums ``w_t * l_t`` itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import LossInputError

BACKENDS = ("chunked", "auto", "liger", "cce")
#: backend -> (module holding the function, the function, the pip package).
KERNELS = {
    "liger": (
        "liger_kernel.transformers.functional",
        "liger_fused_linear_cross_entropy",
        "liger-kernel",
    ),
    "cce": ("cut_cross_entropy", "linear_cross_entropy", "cut-cross-entropy"),
}


def kernel(backend: str) -> Callable[..., Tensor] | None:
    """The kernel function of ``'liger'`` or ``'cce'``; None when its package is missing."""
    module, fn_name, _ = KERNELS[backend]
    try:
        return getattr(importlib.import_module(module), fn_name)
    except ImportError:
        return None


def kernel_device_ok(tensor: Tensor) -> bool:
    """Whether the kernels can run on this tensor's device (Triton: CUDA only)."""
    return tensor.is_cuda


def _unsupported(
    backend: str, has_bias: bool, label_smoothing: float, head_note: str | None = None
) -> str | None:
    if head_note:
        return head_note
    if backend == "cce" and has_bias:
        return "Cut Cross-Entropy has no output-head bias"
    if backend == "cce" and label_smoothing:
        return "Cut Cross-Entropy has no label smoothing"
    return None


def resolve_backend(
    backend: str,
    hidden: Tensor,
    has_bias: bool,
    label_smoothing: float,
    head_note: str | None = None,
) -> str:
    """The backend to run for this batch: ``'chunked'``, ``'liger'`` or ``'cce'``.

    Args:
        head_note: why the kernels cannot reproduce this model's head (logit post-processing,
            ``head='model'``), or None.

    Raises:
        ImportError: an explicit backend whose package is not installed.
        LossInputError: an explicit backend that cannot run this batch (CPU tensors, a head
            bias, label smoothing or a head it does not support).
    """
    if backend == "chunked":
        return "chunked"
    if backend == "auto":
        if not kernel_device_ok(hidden):
            return "chunked"
        for name in ("liger", "cce"):
            if _unsupported(name, has_bias, label_smoothing, head_note) is None and kernel(name):
                return name
        return "chunked"
    module, _, package = KERNELS[backend]
    if kernel(backend) is None:
        raise ImportError(
            f"CrossEntropyLoss(backend={backend!r}) needs the package '{package}' (module "
            f"{module}): pip install {package}; or use backend='chunked' (the default) or 'auto'"
        )
    if not kernel_device_ok(hidden):
        raise LossInputError(
            f"CrossEntropyLoss(backend={backend!r}) runs Triton kernels on CUDA tensors only; "
            f"this batch is on {hidden.device}. Use backend='chunked' (the default) or 'auto', "
            "which falls back to the chunked path off the GPU"
        )
    why = _unsupported(backend, has_bias, label_smoothing, head_note)
    if why:
        other = "'chunked'" if head_note else "'liger' or 'chunked'"
        raise LossInputError(f"CrossEntropyLoss(backend={backend!r}): {why}; use backend={other}")
    return backend


def fused_cross_entropy_sum(
    backend: str,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    token_weights: Tensor,
    label_smoothing: float = 0.0,
    options: dict[str, Any] | None = None,
) -> Tensor:
    """``sum_t w_t * CE_t`` over the given tokens with a fused kernel (autograd-ready).

    Args:
        backend: ``'liger'`` or ``'cce'`` (see :func:`resolve_backend`).
        hidden: ``[n, D]`` hidden states of the valid tokens; ``weight``: ``[V, D]``.
        bias: ``[V]`` or None (liger only); ``targets``: ``[n]``; ``token_weights``: ``[n]``.
        options: extra keyword arguments for the kernel function (e.g. ``accum_dtype`` for
            liger, ``filter_eps`` for cce, whose default here is None: exact gradients).
    """
    fn = kernel(backend)
    unweighted = bool((token_weights == 1).all())
    reduction = "sum" if unweighted else "none"
    kwargs = dict(options or {})
    if backend == "liger":
        kwargs.setdefault("label_smoothing", label_smoothing)
        out = fn(hidden, weight, targets, bias=bias, reduction=reduction, **kwargs)
    else:
        kwargs.setdefault("filter_eps", None)
        out = fn(hidden, weight, targets, reduction=reduction, **kwargs)
    out = out.to(torch.promote_types(weight.dtype, torch.float32))
    if unweighted:
        return out
    return (out * token_weights.to(out.dtype)).sum()
