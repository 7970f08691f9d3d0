"""``LengthGroupedSampler``: batches of samples with similar lengths (less padding)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from mmengine.dist import sync_random_seed
from torch.utils.data import ConcatDataset as TorchConcatDataset
from torch.utils.data import Sampler

from xtuner.parallel.sequence import get_data_parallel_rank, get_data_parallel_world_size


def dataset_lengths(dataset, length_property: str = "length") -> np.ndarray:
    """Per-sample lengths of a data set.

    Read from the attribute ``length_property`` (e.g. ``modality_length`` of LLaVA data, where
    negative means text-only), else from the column of that name of a ``datasets.Dataset``;
    concatenated data sets are read part by part.
    """
    if isinstance(dataset, TorchConcatDataset):
        parts = [dataset_lengths(d, length_property) for d in dataset.datasets]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    value = getattr(dataset, length_property, None)
    if value is None and length_property in (getattr(dataset, "column_names", None) or []):
        value = dataset[length_property]
    if value is None:
        raise ValueError(
            f"{type(dataset).__name__} has no '{length_property}' attribute or column; "
            "LengthGroupedSampler needs one length per sample (process_hf_dataset adds 'length')"
        )
    lengths = np.asarray(value)
    if len(lengths) != len(dataset):
        raise ValueError(f"{len(lengths)} lengths for {len(dataset)} samples")
    return lengths


def _mega_batches(indices: np.ndarray, lengths: np.ndarray, size: int, generator) -> list:
    order = indices[torch.randperm(len(indices), generator=generator).numpy()]
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    # Longest first inside each mega-batch, so neighbouring batches have similar lengths.
    return [b[np.argsort(-np.abs(lengths[b]), kind="stable")] for b in batches]


def get_length_grouped_indices(
    lengths: Sequence[int], group_batch_size: int, generator: torch.Generator | None = None
) -> list[int]:
    """Shuffles, splits into mega-batches of ``group_batch_size`` and sorts each by length.

    Negative lengths mark text-only samples of multimodal data: those and the others form
    mega-batches of their own, whose order is then shuffled. The mega-batch holding the longest
    sample comes first, so a too-long batch fails at the first step rather than hours later.
    """
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return []
    groups = [np.flatnonzero(lengths >= 0), np.flatnonzero(lengths < 0)]
    batches = [
        b for g in groups if len(g) for b in _mega_batches(g, lengths, group_batch_size, generator)
    ]
    if len(groups[1]) and len(groups[0]):
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    longest = max(range(len(batches)), key=lambda i: np.abs(lengths[batches[i]]).max())
    batches.insert(0, batches.pop(longest))
    return np.concatenate(batches).tolist()


class LengthGroupedSampler(Sampler):
    """Distributed sampler whose global batches hold samples of similar length.

    Args:
        dataset: a data set with per-sample lengths (see ``dataset_lengths``).
        per_device_batch_size: samples per rank and step.
        length_property: attribute or column holding the lengths.
        mega_batch_mult: mega-batch size in global batches; default: up to 50, fewer so the
            data set holds at least 4 mega-batches.
        seed: shuffling seed; None draws one shared by all ranks.
        round_up: repeat samples so every rank gets the same count (else drop nothing and
            let the last ranks get one fewer).
    """

    def __init__(
        self,
        dataset,
        per_device_batch_size: int,
        length_property: str = "length",
        mega_batch_mult: int | None = None,
        seed: int | None = None,
        round_up: bool = True,
    ) -> None:
        self.rank = get_data_parallel_rank()
        self.world_size = get_data_parallel_world_size()
        self.dataset = dataset
        self.seed = sync_random_seed() if seed is None else seed
        self.epoch = 0
        self.round_up = round_up
        num = len(dataset)
        if round_up:
            self.num_samples = math.ceil(num / self.world_size)
            self.total_size = self.num_samples * self.world_size
        else:
            self.num_samples = math.ceil(max(num - self.rank, 0) / self.world_size)
            self.total_size = num
        total_batch_size = per_device_batch_size * self.world_size
        if mega_batch_mult is None:
            mega_batch_mult = max(1, min(num // (total_batch_size * 4), 50))
        self.group_batch_size = mega_batch_mult * total_batch_size
        self.length = dataset_lengths(dataset, length_property)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        indices = get_length_grouped_indices(self.length, self.group_batch_size, generator)
        if self.round_up and indices:
            indices = (indices * math.ceil(self.total_size / len(indices)))[: self.total_size]
        return iter(indices[self.rank : self.total_size : self.world_size])

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Reshuffles for ``epoch`` (mmengine's DistSamplerSeedHook calls it)."""
        self.epoch = epoch
