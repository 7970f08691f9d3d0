"""LengthGroupedSampler and InternRepoSampler: coverage, grouping, ranks, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import Dataset

import xtuner.dataset.samplers.intern_repo as intern_module
import xtuner.dataset.samplers.length_grouped as grouped_module
from xtuner.dataset import ConcatDataset
from xtuner.dataset.samplers import (
    InternRepoSampler,
    LengthGroupedSampler,
    get_length_grouped_indices,
)


class Sized:
    def __init__(self, lengths):
        self.length = list(lengths)

    def __len__(self):
        return len(self.length)


def lengths(n=200, seed=0):
    return np.random.default_rng(seed).integers(1, 500, n).tolist()


def fake_ranks(monkeypatch, module, rank, world):
    monkeypatch.setattr(module, "get_data_parallel_rank", lambda: rank)
    monkeypatch.setattr(module, "get_data_parallel_world_size", lambda: world)


def test_mega_batches_are_sorted_and_the_longest_comes_first():
    values = lengths()
    order = get_length_grouped_indices(values, 16)
    assert sorted(order) == list(range(len(values)))
    assert values[order[0]] == max(values)
    for start in range(0, len(order), 16):
        chunk = [values[i] for i in order[start : start + 16]]
        assert chunk == sorted(chunk, reverse=True)


def test_text_only_and_multimodal_samples_do_not_share_mega_batches():
    values = [v if i % 3 else -v for i, v in enumerate(lengths(120))]
    order = get_length_grouped_indices(values, 10)
    assert sorted(order) == list(range(120))
    # 40 text-only and 80 multimodal samples make mega-batches of 10 of one kind each.
    for start in range(0, 120, 10):
        assert len({values[i] > 0 for i in order[start : start + 10]}) == 1
    assert len({values[i] > 0 for i in order}) == 2


def test_single_process_covers_every_sample_and_reshuffles_per_epoch():
    data = Dataset.from_dict({"length": lengths(50)})
    sampler = LengthGroupedSampler(data, per_device_batch_size=4, seed=1)
    first = list(sampler)
    assert sorted(first) == list(range(50)) and len(sampler) == 50
    assert list(LengthGroupedSampler(data, per_device_batch_size=4, seed=1)) == first
    sampler.set_epoch(1)
    assert list(sampler) != first


def test_ranks_split_the_data_and_round_up(monkeypatch):
    values = lengths(101)
    per_rank = []
    for rank in range(2):
        fake_ranks(monkeypatch, grouped_module, rank, 2)
        sampler = LengthGroupedSampler(Sized(values), per_device_batch_size=2, seed=3)
        per_rank.append(list(sampler))
        assert len(sampler) == 51 == len(per_rank[-1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(range(101))
    # Each step's global batch (2 per rank) holds neighbours of one sorted mega-batch.
    step0 = [values[i] for i in per_rank[0][:2] + per_rank[1][:2]]
    assert max(step0) == max(values)
    fake_ranks(monkeypatch, grouped_module, 1, 2)
    assert len(LengthGroupedSampler(Sized(values), 2, seed=3, round_up=False)) == 50


def test_lengths_of_concatenated_datasets_and_a_missing_length():
    parts = [Dataset.from_dict({"length": [3, 1]}), Dataset.from_dict({"length": [7]})]
    sampler = LengthGroupedSampler(ConcatDataset(parts), per_device_batch_size=1, seed=0)
    assert sampler.length.tolist() == [3, 1, 7]
    assert sorted(sampler) == [0, 1, 2]
    with pytest.raises(ValueError, match="'length'"):
        LengthGroupedSampler(Dataset.from_dict({"x": [1]}), per_device_batch_size=1, seed=0)


def test_intern_repo_sampler_order_and_ranks(monkeypatch):
    data = list(range(11))
    expected = np.arange(11)
    np.random.RandomState(1024).shuffle(expected)
    assert list(InternRepoSampler(data)) == expected.tolist()
    assert list(InternRepoSampler(data, shuffle=False)) == data
    got = []
    for rank in range(2):
        fake_ranks(monkeypatch, intern_module, rank, 2)
        sampler = InternRepoSampler(data, seed=1024)
        got.append(list(sampler))
        assert len(sampler) == 5
    assert got[0] == expected[:10][0::2].tolist() and got[1] == expected[:10][1::2].tolist()
    sampler.set_epoch(2)
    assert list(sampler) != got[1]
