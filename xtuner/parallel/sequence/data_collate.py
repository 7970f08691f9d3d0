"""Padding and splitting a batch along the sequence for sequence parallel.

The model-side entry point is :func:`split_batch_for_sequence_parallel`: the model computes
shifted labels, token weights and loss extras on the WHOLE sequence, then hands everything
here to keep only this rank's contiguous shard. The attention layers still need to know the
whole sequence (packed-document boundaries, padding): that travels in a
:class:`SequenceParallelContext` passed to the backbone as a keyword argument, which
transformers forwards unchanged to the registered Ulysses attention function
(:mod:`xtuner.model.modules.sequence_parallel_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from xtuner.utils.constants import IGNORE_INDEX

from .setup_distributed import get_sequence_parallel_rank, get_sequence_parallel_world_size

#: the keyword the backbone receives the context under (read by the attention function).
CONTEXT_KWARG = "sequence_parallel_context"


@dataclass
class SequenceParallelContext:
    """What an attention layer of one shard needs to know about the whole sequence.

    Attributes:
        position_ids: ``[B, S]`` position ids of the whole (padded) sequence; packed documents
            restart at 0.
        attention_mask: ``[B, S]`` padding mask of the whole sequence, or None.
        masks: cache of the full-sequence attention masks built from the two fields above,
            keyed by attention implementation (built once per forward, shared by the layers).
    """

    position_ids: Tensor
    attention_mask: Tensor | None = None
    masks: dict[Any, Any] = field(default_factory=dict)


def pad_for_sequence_parallel(tensor: Tensor, padding_value: Any, dim: int = -1) -> Tensor:
    """Pads ``dim`` of ``tensor`` at the end to a multiple of the sequence-parallel size.

    Args:
        tensor: any tensor.
        padding_value: the value of the new positions.
        dim: the sequence dimension.

    Returns:
        ``tensor`` itself when its length already divides, else a padded copy.
    """
    sp = get_sequence_parallel_world_size()
    length = tensor.shape[dim]
    if length % sp == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = sp - length % sp
    pad = torch.full(shape, padding_value, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=dim)


def _pad_positions(position_ids: Tensor) -> Tensor:
    """Pads position ids by continuing the last document (pads join it at the very end, where
    causal attention keeps them from influencing any real token)."""
    sp = get_sequence_parallel_world_size()
    length = position_ids.shape[-1]
    if length % sp == 0:
        return position_ids
    steps = torch.arange(1, sp - length % sp + 1, device=position_ids.device)
    tail = position_ids[..., -1:] + steps.to(position_ids.dtype)
    return torch.cat([position_ids, tail], dim=-1)


def take_shard(tensor: Tensor, dim: int = 1) -> Tensor:
    """This rank's contiguous shard of ``dim`` (the length must divide by the sp size)."""
    sp = get_sequence_parallel_world_size()
    if sp == 1:
        return tensor
    if tensor.shape[dim] % sp:
        raise ValueError(
            f"cannot split a sequence of length {tensor.shape[dim]} into "
            f"{sp} equal shards: pad it with pad_for_sequence_parallel first"
        )
    return tensor.chunk(sp, dim=dim)[get_sequence_parallel_rank()]


def shard_padding_mask(mask: Tensor | None, batch: int, length: int, device) -> Tensor | None:
    """This rank's shard of the ``[B, S]`` padding mask, the sequence-parallel padding
    included (0 there); None when every token of the shard counts.

    Per-token statistics that are not attention (e.g. the MoE router's) read it, so that
    the pads added for sequence parallel count as little as the data's own padding.
    """
    if mask is None:
        if length % get_sequence_parallel_world_size() == 0:
            return None
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    return take_shard(pad_for_sequence_parallel(mask, 0, dim=1))


def split_batch_for_sequence_parallel(
    inputs: dict[str, Tensor | None],
    labels: Tensor,
    weights: dict[str, Tensor],
    extras: dict[str, Tensor],
) -> tuple[dict[str, Any], Tensor, dict[str, Tensor], dict[str, Tensor]]:
    """Keeps this rank's shard of a batch whose labels are already shifted.

    Args:
        inputs: the backbone's inputs for the whole sequence: ``input_ids`` (or
            ``inputs_embeds``) ``[B, S, ...]``, ``position_ids`` ``[B, S]`` and
            ``attention_mask`` ``[B, S]`` or None; other tensors are split on dim 1 too.
        labels: shifted next-token targets ``[B, S]``.
        weights: weight key -> per-token weights ``[B, S]``.
        extras: per-token loss extras ``[B, S, ...]``.

    Returns:
        ``(inputs, labels, weights, extras)`` of this shard. ``inputs`` holds the local
        tensors, no local mask, and the whole sequence's :class:`SequenceParallelContext`
        under :data:`CONTEXT_KWARG`. Sequences whose length does not divide by the sp size
        are padded at the end first (ignored targets, zero weights).
    """
    batch, length = labels.shape[:2]
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(length, device=labels.device)[None]
    position_ids = _pad_positions(position_ids.expand(batch, length))
    mask = inputs.get("attention_mask")
    if mask is not None:
        mask = pad_for_sequence_parallel(mask, 0, dim=1)
    local_inputs: dict[str, Any] = {
        key: take_shard(pad_for_sequence_parallel(value, 0, dim=1))
        for key, value in inputs.items()
        if isinstance(value, Tensor) and key not in ("position_ids", "attention_mask")
    }
    local_inputs["position_ids"] = take_shard(position_ids)
    local_inputs["attention_mask"] = None
    local_inputs[CONTEXT_KWARG] = SequenceParallelContext(position_ids, mask)
    labels = take_shard(pad_for_sequence_parallel(labels, IGNORE_INDEX, dim=1))
    weights = {k: take_shard(pad_for_sequence_parallel(w, 0, dim=1)) for k, w in weights.items()}
    extras = {k: take_shard(pad_for_sequence_parallel(v, 0, dim=1)) for k, v in extras.items()}
    return local_inputs, labels, weights, extras
