"""A data sampler that gives every rank of one sequence-parallel group the same samples."""

from __future__ import annotations

import math
from collections.abc import Sized

from mmengine.dataset import DefaultSampler
from mmengine.registry import DATA_SAMPLERS

from .setup_distributed import get_data_parallel_rank, get_data_parallel_world_size


@DATA_SAMPLERS.register_module()
class SequenceParallelSampler(DefaultSampler):
    """mmengine's ``DefaultSampler`` partitioned over data-parallel ranks only.

    The ranks of a sequence-parallel group each hold a shard of the same sequences, so they
    must draw the same samples: the dataset is split into ``dp world size`` parts (not
    ``world size``) and each rank takes its data-parallel rank's part. Without sequence
    parallel this is exactly ``DefaultSampler``. Build it after
    :func:`~xtuner.parallel.sequence.init_sequence_parallel` (``xtuner train`` does).

    Args:
        dataset: the dataset.
        shuffle: shuffle every epoch (same order on all ranks, seeded by ``seed + epoch``).
        seed: the shuffling seed; synchronised across ranks when None.
        round_up: repeat samples so every data-parallel rank gets the same number.
    """

    def __init__(
        self,
        dataset: Sized,
        shuffle: bool = True,
        seed: int | None = None,
        round_up: bool = True,
    ) -> None:
        super().__init__(dataset, shuffle=shuffle, seed=seed, round_up=round_up)
        self.rank = get_data_parallel_rank()
        self.world_size = get_data_parallel_world_size()
        if round_up:
            self.num_samples = math.ceil(len(dataset) / self.world_size)
            self.total_size = self.num_samples * self.world_size
        else:
            self.num_samples = math.ceil((len(dataset) - self.rank) / self.world_size)
            self.total_size = len(dataset)
