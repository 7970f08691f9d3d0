"""Ulysses sequence-parallel attention as transformers attention functions.

For each kernel transformers offers (``sdpa``, ``eager``, ``flash_attention_2``/``_3``) an
attention function ``xtuner_ulysses_<kernel>`` is registered in transformers'
``AttentionInterface`` (and the kernel's mask builder under the same name in
``AttentionMaskInterface``). :func:`enable_sequence_parallel_attention` switches a model's
``config._attn_implementation`` to the Ulysses name of its current kernel, so every model
that dispatches attention through the registry (Llama, Qwen2, Mistral, ... in transformers
5) runs sequence parallel without patching its code.

Each call receives ``q``, ``k``, ``v`` of this rank's sequence shard. When the backbone was
given a :class:`~xtuner.parallel.sequence.SequenceParallelContext` (the model-side split does
that), the function re-shards to heads, builds the attention mask of the WHOLE sequence
exactly as transformers would without sequence parallel (packed documents found from the
full ``position_ids``, padding from the full mask, sliding windows), runs the kernel and
re-shards the output back to the sequence. Without a context (e.g. generation, which never
splits the sequence), the call is the plain kernel.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from mmengine.logging import print_log
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from xtuner.parallel.sequence import (
    SequenceParallelContext,
    check_heads_for_sequence_parallel,
    get_sequence_parallel_world_size,
    post_process_for_sequence_parallel_attn,
    pre_process_for_sequence_parallel_attn,
)

from .packed_attention import FLASH_KERNELS, packed_flash_kwargs

PREFIX = "xtuner_ulysses_"
#: the kernels that get a Ulysses version.
WRAPPED_KERNELS = ("sdpa", "eager", *FLASH_KERNELS)


class _View:
    """Delegates to ``target`` except for the attributes given (what the kernel must see)."""

    def __init__(self, target: Any, **overrides: Any):
        self._target = target
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def _kernel(name: str, module: nn.Module) -> Callable:
    if name == "eager":
        # Models define their own eager attention next to the attention module.
        kernel = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if kernel is None:
            raise NotImplementedError(
                f"{type(module).__name__} defines no eager_attention_forward: use "
                "attn_implementation='sdpa' with sequence parallel"
            )
        return kernel
    return ALL_ATTENTION_FUNCTIONS[name]


@functools.cache
def _mask_arguments(builder: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(builder).parameters)


def _full_sequence_mask(
    context: SequenceParallelContext, config: Any, query: Tensor, sliding_window: int | None
):
    """The mask transformers would build for the whole sequence (cached per forward)."""
    key = (config._attn_implementation, sliding_window, query.dtype)
    if key not in context.masks:
        builder = create_sliding_window_causal_mask if sliding_window else create_causal_mask
        params = _mask_arguments(builder)
        batch, length = query.shape[0], context.position_ids.shape[-1]
        kwargs: dict[str, Any] = {
            "config": config,
            "attention_mask": context.attention_mask,
            "position_ids": context.position_ids,
        }
        # Only the shape, dtype and device of the embeddings are read.
        embeds = query.new_empty(batch, length, 1)
        kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = embeds
        for name in ("cache", "past_key_values"):
            if name in params:
                kwargs[name] = None
        if "cache_position" in params:
            kwargs["cache_position"] = torch.arange(length, device=query.device)
        context.masks[key] = builder(**kwargs)
    return context.masks[key]


def _ulysses(kernel_name: str) -> Callable:
    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        sequence_parallel_context: SequenceParallelContext | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, None]:
        kernel = _kernel(kernel_name, module)
        config = _View(module.config, _attn_implementation=kernel_name)
        groups = getattr(module, "num_key_value_groups", 1)
        if sequence_parallel_context is None:
            view = _View(module, config=config, num_key_value_groups=groups)
            return kernel(view, query, key, value, attention_mask, **kwargs)
        # [B, H, S/sp, D] -> [B, H/sp, S, D]; kv heads repeated if they do not divide by sp.
        query, key, value = pre_process_for_sequence_parallel_attn(
            query, key, value, scatter_dim=1, gather_dim=2
        )
        view = _View(module, config=config, num_key_value_groups=query.shape[1] // key.shape[1])
        mask = _full_sequence_mask(
            sequence_parallel_context, config, query, kwargs.get("sliding_window")
        )
        # Flash kernels keep packed documents apart with the whole sequence's document
        # boundaries (computed once per forward).
        kwargs["position_ids"] = sequence_parallel_context.position_ids
        if kernel_name in FLASH_KERNELS:
            masks = sequence_parallel_context.masks
            if "flash_varlen" not in masks:
                masks["flash_varlen"] = packed_flash_kwargs(
                    kernel_name, sequence_parallel_context.position_ids
                )
            kwargs.update(masks["flash_varlen"])
        output, _ = kernel(view, query, key, value, mask, **kwargs)
        # [B, S, H/sp, D] -> [B, S/sp, H, D]
        return post_process_for_sequence_parallel_attn(output, scatter_dim=1, gather_dim=2), None

    attention.__name__ = attention.__qualname__ = f"{PREFIX}{kernel_name}"
    return attention


def register_sequence_parallel_attention() -> None:
    """Registers ``xtuner_ulysses_<kernel>`` for every available kernel (idempotent)."""
    for kernel in WRAPPED_KERNELS:
        if kernel not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            continue
        name = PREFIX + kernel
        AttentionInterface.register(name, _ulysses(kernel))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[kernel])


def enable_sequence_parallel_attention(model: nn.Module) -> None:
    """Switches a transformers model to the Ulysses version of its attention kernel.

    Idempotent; a no-op without sequence parallel. Raises a clear error for models that do
    not dispatch attention through transformers' registry (e.g. remote-code models), for
    kernels without a Ulysses version, and when the attention heads do not divide by the
    sequence-parallel size.
    """
    sp = get_sequence_parallel_world_size()
    config = model.config
    current = config._attn_implementation or "eager"
    if sp == 1 or current.startswith(PREFIX):
        return
    if not getattr(model, "_supports_attention_backend", False):
        raise NotImplementedError(
            f"sequence parallel needs a model whose attention goes through transformers' "
            f"AttentionInterface; {type(model).__name__} does not (remote code?): use a "
            "model class built into transformers, or sequence_parallel_size=1"
        )
    if current not in WRAPPED_KERNELS:
        raise NotImplementedError(
            f"sequence parallel wraps attn_implementation in {WRAPPED_KERNELS}, but the model "
            f"uses {current!r}: set llm.attn_implementation to one of them"
        )
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    check_heads_for_sequence_parallel(text_config.num_attention_heads, sp)
    config._attn_implementation = PREFIX + current
    print_log(
        f"sequence parallel (Ulysses, size {sp}): attention {current!r} -> {PREFIX + current!r}",
        logger="current",
    )


register_sequence_parallel_attention()
