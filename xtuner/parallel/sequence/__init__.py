"""Sequence parallel (Ulysses) with the upstream XTuner names."""

from .setup_distributed import (
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_sequence_parallel_group,
    get_sequence_parallel_rank,
    get_sequence_parallel_world_size,
    init_sequence_parallel,
    is_sequence_parallel_initialized,
)

__all__ = [
    "init_sequence_parallel",
    "is_sequence_parallel_initialized",
    "get_sequence_parallel_group",
    "get_sequence_parallel_world_size",
    "get_sequence_parallel_rank",
    "get_data_parallel_group",
    "get_data_parallel_world_size",
    "get_data_parallel_rank",
]
