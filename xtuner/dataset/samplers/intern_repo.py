"""``InternRepoSampler``: the data order of InternLM's training repository (InternEvo)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from xtuner.parallel.sequence import get_data_parallel_rank, get_data_parallel_world_size


class InternRepoSampler(Sampler):
    """Shuffles with numpy's ``RandomState(seed + epoch)`` and deals samples round-robin.

    The tail that does not fill every rank is dropped. Seed 1024 (the default) reproduces the
    order InternEvo trains in.

    Args:
        dataset: any sized data set.
        shuffle: shuffle each epoch (else the data set order).
        seed: shuffling seed; None means 1024.
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int | None = None) -> None:
        self.rank = get_data_parallel_rank()
        self.world_size = get_data_parallel_world_size()
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = 1024 if seed is None else seed
        self.epoch = 0
        self.num_samples = len(dataset) // self.world_size
        self.total_size = self.num_samples * self.world_size

    def __iter__(self) -> Iterator[int]:
        indices = np.arange(len(self.dataset))
        if self.shuffle:
            np.random.RandomState(self.seed + self.epoch).shuffle(indices)
        return iter(indices[: self.total_size][self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Reshuffles for ``epoch`` (mmengine's DistSamplerSeedHook calls it)."""
        self.epoch = epoch
