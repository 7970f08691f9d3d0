"""Batches of multiple-choice (MMLU-style) prompts for :class:`xtuner.evaluation.MMLUMetric`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from xtuner.utils.constants import DEFAULT_PAD_TOKEN_INDEX

LETTERS = ("A", "B", "C", "D")


def _answer(instance: dict) -> int:
    """The index (0-3) of an instance's answer: ``answer`` (an index), or ``output`` (a letter)."""
    if "answer" in instance:
        return int(instance["answer"])
    letter = str(instance.get("output", "")).strip()
    if letter not in LETTERS:
        raise ValueError(
            f"mmlu_collate_fn: a record's output must be the answer letter (A, B, C or D), got "
            f"{instance.get('output')!r}; keep the 'output' column (remove_unused_columns=False)"
        )
    return LETTERS.index(letter)


def mmlu_collate_fn(
    instances: Sequence[dict],
    pad_index: int = DEFAULT_PAD_TOKEN_INDEX,
    return_hf_format: bool = False,
) -> dict:
    """Right-pads the prompts; ``data_samples`` keep each prompt's length, answer and subject.

    An instance is either a record of ``process_hf_dataset(..., dataset_map_fn=default_map_fn,
    input_ids_with_output=False)`` -- ``input_ids``, ``output`` (the answer letter) and
    ``subject``, as XTuner 0.x MMLU configs build their validation set -- or an
    :class:`~xtuner.evaluation.MMLUDataset` item (``answer`` is the letter's index).

    Args:
        instances: the prompts of the batch.
        pad_index: the id the prompts are padded with.
        return_hf_format: return only the model inputs (``input_ids``, ``attention_mask``).

    Returns:
        ``{'data': {'input_ids', 'attention_mask'}, 'data_samples': [{'length', 'answer',
        'subject'}, ...]}``.
    """
    width = max(len(x["input_ids"]) for x in instances)
    ids = torch.full((len(instances), width), pad_index, dtype=torch.long)
    mask = torch.zeros((len(instances), width), dtype=torch.bool)
    for row, x in enumerate(instances):
        ids[row, : len(x["input_ids"])] = torch.as_tensor(x["input_ids"])
        mask[row, : len(x["input_ids"])] = True
    data = {"input_ids": ids, "attention_mask": mask}
    if return_hf_format:
        return data
    samples = [
        {"length": len(x["input_ids"]), "answer": _answer(x), "subject": x.get("subject") or "all"}
        for x in instances
    ]
    return {"data": data, "data_samples": samples}
