"""Sequence parallel (Ulysses) with the upstream XTuner names.

Process groups (:mod:`.setup_distributed`), collectives with autograd
(:mod:`.communications`), padding and the model-side batch split (:mod:`.data_collate`),
re-sharding around attention (:mod:`.attention`), the differentiable loss reduction
(:mod:`.reduce_loss`) and the sampler (:mod:`.sampler`).
"""

from .attention import (
    check_heads_for_sequence_parallel,
    kv_repeats_for_sequence_parallel,
    post_process_for_sequence_parallel_attn,
    pre_process_for_sequence_parallel_attn,
)
from .communications import (
    all_to_all,
    gather_for_sequence_parallel,
    gather_forward_split_backward,
    split_for_sequence_parallel,
    split_forward_gather_backward,
)
from .data_collate import (
    CONTEXT_KWARG,
    SequenceParallelContext,
    pad_for_sequence_parallel,
    shard_padding_mask,
    split_batch_for_sequence_parallel,
)
from .reduce_loss import reduce_sequence_parallel_loss
from .sampler import SequenceParallelSampler
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
    "all_to_all",
    "split_for_sequence_parallel",
    "gather_for_sequence_parallel",
    "split_forward_gather_backward",
    "gather_forward_split_backward",
    "pad_for_sequence_parallel",
    "split_batch_for_sequence_parallel",
    "shard_padding_mask",
    "SequenceParallelContext",
    "CONTEXT_KWARG",
    "pre_process_for_sequence_parallel_attn",
    "post_process_for_sequence_parallel_attn",
    "check_heads_for_sequence_parallel",
    "kv_repeats_for_sequence_parallel",
    "reduce_sequence_parallel_loss",
    "SequenceParallelSampler",
]
