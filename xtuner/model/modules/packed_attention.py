"""Packed documents on flash-attention, for any batch size.

transformers' flash-attention path finds packed documents from ``position_ids`` only in a
batch of one row; with more rows it runs causal attention over each whole row, and the
documents of a row attend each other. Given ``cu_seq_lens_q/k`` and ``max_length_q/k``
(transformers' ``FlashAttentionKwargs``) it runs the varlen kernel over the flattened batch
instead, for any batch size. sdpa and eager need nothing: transformers' masking functions
build the document mask from the position ids.
"""

from __future__ import annotations

from torch import Tensor
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

#: the kernels that take varlen keyword arguments.
FLASH_KERNELS = ("flash_attention_2", "flash_attention_3")


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
