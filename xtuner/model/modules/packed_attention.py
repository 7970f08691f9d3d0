"""Packed documents on the attention kernels that need help: flash-attention and flex-attention.

transformers' masking functions keep packed documents apart from ``position_ids`` that
restart at 0 (with no attention mask and no cache): sdpa and eager get a dense ``[B, 1, S, S]``
document mask, flex-attention a ``BlockMask``. Flash-attention finds packed documents from
``position_ids`` only in a batch of one row; with more rows it runs causal attention over each
whole row, and the documents of a row attend each other. Given ``cu_seq_lens_q/k`` and
``max_length_q/k`` (transformers' ``FlashAttentionKwargs``) it runs the varlen kernel over the
flattened batch instead, for any batch size.

Flex-attention has no backward pass on the CPU in torch: a training step there is refused
before the forward, with the way out, instead of torch's error from inside the compiled kernel.
The build-time probes run on the CPU (where a model is built before the runner moves it to the
GPU) with sdpa in place of flex-attention, see :func:`probe_attention`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

#: the kernels that take varlen keyword arguments.
FLASH_KERNELS = ("flash_attention_2", "flash_attention_3")
#: transformers' name of torch's FlexAttention kernel.
FLEX_KERNEL = "flex_attention"


def packed_flash_kwargs(kernel: str, position_ids: Tensor) -> dict[str, Tensor]:
    """The varlen keyword arguments of ``[B, S]`` packed rows (documents start where the
    position is 0, and so does every row) for a flash kernel; ``{}`` for other kernels."""
    if kernel not in FLASH_KERNELS:
        return {}
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(position_ids)
    return {
        "cu_seq_lens_q": cu_q,
        "cu_seq_lens_k": cu_k,
        "max_length_q": max_q,
        "max_length_k": max_k,
    }


def check_trainable_attention(model: nn.Module, inputs: dict[str, Tensor | None]) -> None:
    """Refuses a training step with ``attn_implementation='flex_attention'`` on the CPU.

    torch's FlexAttention has no CPU backward: with inputs that need gradients it raises
    from inside the compiled kernel, after the compile. A step is taken to need them when
    gradients are enabled and the model has a trainable parameter or is given embeddings
    that need gradients (a model whose only trainable part is its output head is refused
    too, though its attention would need no backward).

    Args:
        model: the causal LM whose ``config._attn_implementation`` is used.
        inputs: the model's inputs (``input_ids`` or ``inputs_embeds``, ``[B, S, ...]``).

    Raises:
        ValueError: flex-attention, a CPU tensor and gradients, with the ways out.
    """
    if getattr(model.config, "_attn_implementation", None) != FLEX_KERNEL:
        return
    tokens = inputs.get("inputs_embeds")
    if tokens is None:
        tokens = inputs["input_ids"]
    if not torch.is_grad_enabled() or tokens.device.type != "cpu":
        return
    if not tokens.requires_grad and not any(p.requires_grad for p in model.parameters()):
        return
    raise ValueError(
        f"{type(model).__name__} uses attn_implementation='flex_attention', which cannot "
        "train on the CPU: torch's FlexAttention has no backward pass on the CPU (it raises "
        "NotImplementedError for inputs that need gradients), and this step computes "
        "gradients with the model on the CPU. Train with flex_attention on a CUDA GPU, or on "
        "the CPU set attn_implementation='sdpa' (or 'eager') in the llm config: packed "
        "documents (use_varlen_attn=True) stay apart on every one of them. On the CPU, "
        "flex_attention works without gradients (evaluation, chat)."
    )


@contextlib.contextmanager
def probe_attention(model: nn.Module) -> Iterator[None]:
    """The attention of the build-time probes (a few tokens, no gradients) inside the block.

    A model on the CPU with ``attn_implementation='flex_attention'`` runs them on sdpa (eager
    for a family without sdpa). The model is built on the CPU and moved to the GPU by the
    runner, so the probes would otherwise compile torch's CPU flex kernel (15-30 s per shape)
    that training never uses, and that kernel is wrong at some lengths (torch 2.13: 8 tokens
    with a causal mask). What the packing probe checks does not depend on the kernel: the
    model's attention follows ``position_ids`` through transformers' masking functions, which
    find the packed documents the same way for every kernel (a dense mask for sdpa, a
    ``BlockMask`` for flex). On the GPU the probes run on flex itself.
    """
    config = model.config
    kernel = getattr(config, "_attn_implementation", None)
    device = model.get_input_embeddings().weight.device
    if kernel != FLEX_KERNEL or device.type != "cpu":
        yield
        return
    config._attn_implementation = "sdpa" if getattr(model, "_supports_sdpa", False) else "eager"
    try:
        yield
    finally:
        config._attn_implementation = kernel
