"""``default_collate_fn``: pads samples into a batch for causal-LM training."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from xtuner.parallel.sequence import get_sequence_parallel_world_size
from xtuner.utils.constants import DEFAULT_PAD_TOKEN_INDEX, IGNORE_INDEX


def _boundaries(instance: dict, length: int, padded: int, use_varlen_attn: bool) -> list[int]:
    """Document starts of one row: its ``cumulative_len`` (or the whole row), plus the padding."""
    bounds = list(instance.get("cumulative_len") or [0, length]) if use_varlen_attn else [0, length]
    if bounds[0] != 0 or bounds[-1] != length:
        raise ValueError(
            f"cumulative_len {bounds} must start at 0 and end at the row length {length}"
        )
    if padded > length:
        bounds.append(padded)  # padding is a run of its own
    return bounds


def default_collate_fn(
    instances: Sequence[dict],
    pad_index: int = DEFAULT_PAD_TOKEN_INDEX,
    return_hf_format: bool = False,
    use_varlen_attn: bool = False,
) -> dict:
    """Right-pads samples into a batch.

    Args:
        instances: samples with ``input_ids`` and ``labels``; optionally ``loss_weight``,
            ``cumulative_len`` (packed rows) and ``pixel_values``.
        pad_index: id written into padded ``input_ids`` positions.
        return_hf_format: return the bare data dict instead of mmengine's
            ``{'data': ..., 'data_samples': None}``.
        use_varlen_attn: position ids restart at 0 at each document of a packed row, and the
            batch carries ``cumulative_len`` and ``max_seqlen``.

    Returns:
        ``input_ids`` (pad_index), ``labels`` (-100), ``attention_mask`` (bool, True on real
        tokens) and ``position_ids``, all ``[batch, seq]`` with ``seq`` rounded up to a multiple
        of the sequence-parallel size; ``loss_weight`` (0 on padding) when a sample has one;
        with ``use_varlen_attn`` a list of per-row ``cumulative_len`` tensors (int32, ending at
        the padded length, the padding being a run of its own) and ``max_seqlen`` (int);
        ``pixel_values`` stacked when samples carry images (a list if their shapes differ).
    """
    if not instances:
        raise ValueError("default_collate_fn got an empty batch")
    lengths = [len(x["input_ids"]) for x in instances]
    seq_len = max(lengths)
    sp_size = get_sequence_parallel_world_size()
    if sp_size > 1:
        seq_len = math.ceil(seq_len / sp_size) * sp_size
    batch = len(instances)

    input_ids = torch.full((batch, seq_len), pad_index, dtype=torch.long)
    labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq_len), dtype=torch.bool)
    position_ids = torch.zeros((batch, seq_len), dtype=torch.long)
    has_weight = any(x.get("loss_weight") is not None for x in instances)
    loss_weight = torch.zeros((batch, seq_len), dtype=torch.float32) if has_weight else None
    cumulative_len = []
    max_seqlen = 0
    for i, (x, n) in enumerate(zip(instances, lengths)):
        if len(x["labels"]) != n:
            raise ValueError(f"sample {i}: {len(x['labels'])} labels for {n} input_ids")
        input_ids[i, :n] = torch.as_tensor(x["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(x["labels"], dtype=torch.long)
        attention_mask[i, :n] = True
        if loss_weight is not None:
            weights = x.get("loss_weight")
            loss_weight[i, :n] = 1.0 if weights is None else torch.as_tensor(weights)
        bounds = torch.tensor(_boundaries(x, n, seq_len, use_varlen_attn), dtype=torch.int32)
        runs = bounds[1:] - bounds[:-1]
        starts = torch.repeat_interleave(bounds[:-1].long(), runs.long())
        position_ids[i] = torch.arange(seq_len) - starts
        if use_varlen_attn:
            cumulative_len.append(bounds)
            max_seqlen = max(max_seqlen, int(runs.max()) if len(runs) else 0)

    data = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }
    if loss_weight is not None:
        data["loss_weight"] = loss_weight
    if use_varlen_attn:
        data["cumulative_len"] = cumulative_len
        data["max_seqlen"] = max_seqlen
    pixel_values = [x.get("pixel_values") for x in instances]
    if any(p is not None for p in pixel_values):
        tensors = [torch.as_tensor(p) for p in pixel_values if p is not None]
        same = len(tensors) == batch and all(t.shape == tensors[0].shape for t in tensors)
        data["pixel_values"] = torch.stack(tensors) if same else pixel_values
    if return_hf_format:
        return data
    return {"data": data, "data_samples": None}
