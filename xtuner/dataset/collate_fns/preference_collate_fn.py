"""``preference_collate_fn``: batches of (chosen, rejected) pairs for DPO, ORPO, reward models."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xtuner.utils.constants import DEFAULT_PAD_TOKEN_INDEX

from .default_collate_fn import default_collate_fn


def preference_collate_fn(
    instances: Sequence[dict],
    pad_index: int = DEFAULT_PAD_TOKEN_INDEX,
    return_hf_format: bool = False,
    use_varlen_attn: bool = False,
) -> dict:
    """Pads preference samples into a batch whose sequences alternate chosen, rejected.

    Args:
        instances: without ``use_varlen_attn``, pairs (``chosen_ids``, ``chosen_labels``,
            ``rejected_ids``, ``rejected_labels``): each answer becomes a row, so a batch of
            ``n`` pairs has ``2n`` rows ``chosen_0, rejected_0, chosen_1, ...``. With it,
            packed rows (``input_ids``, ``labels``, ``cumulative_len``) of whole pairs, as
            ``build_preference_dataset(..., use_varlen_attn=True)`` makes them. Unpaired
            (KTO) samples (``input_ids``, ``labels``, ``kto_label``) become one row each,
            their labels the batch field ``kto_labels``.
        pad_index: id of padded ``input_ids`` positions.
        return_hf_format: return the bare data dict.
        use_varlen_attn: the instances are packed rows.

    Returns:
        As :func:`~xtuner.dataset.collate_fns.default_collate_fn`, except that the padding
        continues the last answer's positions instead of starting a document of its own (no
        target is there, and causal attention keeps it from every real token), so the
        sequences of a batch are exactly its answers.
    """
    if not instances:
        raise ValueError("preference_collate_fn got an empty batch")
    if use_varlen_attn:
        if "input_ids" not in instances[0]:
            raise ValueError(
                "preference_collate_fn(use_varlen_attn=True) needs packed rows: build the data "
                "with build_preference_dataset(..., use_varlen_attn=True)"
            )
        rows = list(instances)
    elif "kto_label" in instances[0]:
        rows = list(instances)  # unpaired (KTO): one answer per row, its label per row
    else:
        if "chosen_ids" not in instances[0]:
            raise ValueError(
                "preference_collate_fn got packed rows: pass use_varlen_attn=True, as the data "
                "set was built with use_varlen_attn=True"
            )
        rows = []
        for x in instances:
            rows.append({"input_ids": x["chosen_ids"], "labels": x["chosen_labels"]})
            rows.append({"input_ids": x["rejected_ids"], "labels": x["rejected_labels"]})
    data = default_collate_fn(rows, pad_index, True, use_varlen_attn=use_varlen_attn)
    positions = data["position_ids"]
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        if n < positions.shape[1]:
            positions[i, n:] = torch.arange(1, positions.shape[1] - n + 1) + positions[i, n - 1]
    if "kto_label" in rows[0]:
        data["kto_labels"] = torch.tensor([bool(row["kto_label"]) for row in rows])
    if return_hf_format:
        return data
    return {"data": data, "data_samples": None}
