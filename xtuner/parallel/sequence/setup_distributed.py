"""Process groups for sequence parallel (Ulysses) and the data parallel groups beside it.

With world size ``W`` and sequence-parallel size ``sp``, ranks ``[k*sp, (k+1)*sp)`` share one
sequence (a sequence-parallel group) and ranks with the same index inside their group form a
data-parallel group. Every getter answers for the single-process case too (size 1, rank 0).
"""

from __future__ import annotations

import torch.distributed as dist

_SP_GROUP = None
_SP_SIZE = 1
_DP_GROUP = None


def init_sequence_parallel(sequence_parallel_size: int = 1) -> None:
    """Creates the sequence- and data-parallel groups (call once, on every rank)."""
    global _SP_GROUP, _SP_SIZE, _DP_GROUP
    if sequence_parallel_size < 1:
        raise ValueError(f"sequence_parallel_size must be >= 1, got {sequence_parallel_size}")
    if sequence_parallel_size == 1 and not dist.is_initialized():
        _SP_GROUP, _SP_SIZE, _DP_GROUP = None, 1, None
        return
    if not dist.is_initialized():
        raise RuntimeError(
            f"sequence_parallel_size={sequence_parallel_size} needs a distributed launch: "
            "run with NPROC_PER_NODE=N xtuner train CONFIG (N a multiple of it)"
        )
    world = dist.get_world_size()
    if world % sequence_parallel_size:
        raise ValueError(
            f"world size {world} is not divisible by sequence_parallel_size="
            f"{sequence_parallel_size}; set NPROC_PER_NODE to a multiple of it"
        )
    rank = dist.get_rank()
    sp_groups = [
        list(range(start, start + sequence_parallel_size))
        for start in range(0, world, sequence_parallel_size)
    ]
    dp_groups = [
        list(range(i, world, sequence_parallel_size)) for i in range(sequence_parallel_size)
    ]
    for ranks in sp_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            _SP_GROUP = group
    for ranks in dp_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            _DP_GROUP = group
    _SP_SIZE = sequence_parallel_size


def is_sequence_parallel_initialized() -> bool:
    return _SP_SIZE > 1


def get_sequence_parallel_group():
    return _SP_GROUP


def get_sequence_parallel_world_size() -> int:
    return _SP_SIZE


def get_sequence_parallel_rank() -> int:
    if _SP_SIZE == 1:
        return 0
    return dist.get_rank(group=_SP_GROUP)


def get_data_parallel_group():
    return _DP_GROUP


def get_data_parallel_world_size() -> int:
    if not dist.is_initialized():
        return 1
    return dist.get_world_size() // _SP_SIZE


def get_data_parallel_rank() -> int:
    if not dist.is_initialized():
        return 0
    return dist.get_rank() // _SP_SIZE
