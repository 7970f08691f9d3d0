"""default_collate_fn: padding values, masks, position ids, varlen fields, sp padding, images."""

from __future__ import annotations

import importlib

import pytest
import torch

from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.utils.constants import IGNORE_INDEX

# The package re-exports the function under the module's name.
collate_module = importlib.import_module("xtuner.dataset.collate_fns.default_collate_fn")


def samples():
    return [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "cumulative_len": [0, 2, 5]},
        {"input_ids": [1, 2], "labels": [1, 2], "cumulative_len": [0, 2]},
    ]


def test_padding_mask_and_positions():
    out = default_collate_fn(samples(), pad_index=3)
    assert set(out) == {"data", "data_samples"} and out["data_samples"] is None
    data = out["data"]
    assert data["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 3, 3]]
    assert data["labels"].tolist() == [[-100, 6, 7, 8, 9], [1, 2, -100, -100, -100]]
    assert data["attention_mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert data["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]
    assert data["input_ids"].dtype == torch.long and data["labels"].dtype == torch.long
    assert "cumulative_len" not in data and "loss_weight" not in data
    bare = default_collate_fn(samples(), return_hf_format=True)
    assert set(bare) == {"input_ids", "labels", "attention_mask", "position_ids"}


def test_varlen_positions_restart_per_document_and_padding_is_its_own_run():
    data = default_collate_fn(samples(), use_varlen_attn=True, return_hf_format=True)
    assert data["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]
    assert [c.tolist() for c in data["cumulative_len"]] == [[0, 2, 5], [0, 2, 5]]
    assert all(c.dtype == torch.int32 for c in data["cumulative_len"])
    assert data["max_seqlen"] == 3
    no_bounds = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}]
    data = default_collate_fn(no_bounds, use_varlen_attn=True, return_hf_format=True)
    assert data["cumulative_len"][0].tolist() == [0, 3] and data["max_seqlen"] == 3
    with pytest.raises(ValueError, match="cumulative_len"):
        default_collate_fn(
            [{"input_ids": [1, 2], "labels": [1, 2], "cumulative_len": [0, 1]}],
            use_varlen_attn=True,
        )


def test_loss_weight_padding_and_default():
    batch = samples()
    batch[1]["loss_weight"] = [0.5, 2.0]
    data = default_collate_fn(batch, return_hf_format=True)
    assert data["loss_weight"].tolist() == [[1.0] * 5, [0.5, 2.0, 0.0, 0.0, 0.0]]
    assert data["loss_weight"].dtype == torch.float32


def test_sequence_parallel_pads_to_a_multiple(monkeypatch):
    monkeypatch.setattr(collate_module, "get_sequence_parallel_world_size", lambda: 4)
    data = default_collate_fn(samples(), use_varlen_attn=True, return_hf_format=True)
    assert data["input_ids"].shape == (2, 8)
    assert data["labels"][:, 5:].eq(IGNORE_INDEX).all()
    assert not data["attention_mask"][:, 5:].any()
    assert data["position_ids"][0].tolist() == [0, 1, 0, 1, 2, 0, 1, 2]
    assert data["cumulative_len"][0].tolist() == [0, 2, 5, 8]


def test_pixel_values_are_stacked():
    batch = samples()
    for i, sample in enumerate(batch):
        sample["pixel_values"] = torch.full((3, 4, 4), float(i))
    data = default_collate_fn(batch, return_hf_format=True)
    assert data["pixel_values"].shape == (2, 3, 4, 4)
    assert data["pixel_values"][1].eq(1.0).all()
