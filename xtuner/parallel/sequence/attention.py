"""Ulysses re-sharding around an attention kernel: sequence shards <-> head shards.

Before attention each rank holds all heads of its sequence shard; one all-to-all gives it
``heads / sp`` heads of the whole sequence, so any ordinary attention kernel computes exact
attention over the full sequence; a second all-to-all brings the output back to sequence
shards. :mod:`xtuner.model.modules.sequence_parallel_attention` wires this into
transformers' attention-function registry.
"""

from __future__ import annotations

import math

from torch import Tensor

from .communications import all_to_all
from .setup_distributed import get_sequence_parallel_group, get_sequence_parallel_world_size


def check_heads_for_sequence_parallel(num_heads: int, sp: int | None = None) -> None:
    """Raises a clear error when the attention heads cannot be spread over the sp ranks."""
    sp = sp or get_sequence_parallel_world_size()
    if num_heads % sp:
        raise ValueError(
            f"sequence parallel splits attention heads across ranks: num_attention_heads="
            f"{num_heads} is not divisible by sequence_parallel_size={sp}; choose a "
            f"sequence_parallel_size that divides {num_heads}"
        )


def kv_repeats_for_sequence_parallel(num_kv_heads: int, sp: int | None = None) -> int:
    """How many times each key/value head must be repeated so the kv heads divide by sp.

    With grouped-query attention, fewer kv heads than ranks (or a count that does not
    divide) would leave some ranks without their keys. Repeating each kv head
    ``sp / gcd(kv_heads, sp)`` times is the least repetition that divides. Both sp and the
    kv head count divide the query head count, so their lcm (the repeated kv head count)
    does too: every query head still has exactly one kv head.
    """
    sp = sp or get_sequence_parallel_world_size()
    return sp // math.gcd(num_kv_heads, sp)


def _repeat_heads(x: Tensor, repeats: int, head_dim: int) -> Tensor:
    if repeats == 1:
        return x
    return x.repeat_interleave(repeats, dim=head_dim)


def pre_process_for_sequence_parallel_attn(
    query_states: Tensor,
    key_states: Tensor,
    value_states: Tensor,
    scatter_dim: int = 2,
    gather_dim: int = 1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence shards -> head shards for ``q``, ``k``, ``v`` (differentiable).

    The defaults suit the ``[B, S/sp, H, D]`` layout (flash-attention's); pass
    ``scatter_dim=1, gather_dim=2`` for ``[B, H, S/sp, D]`` (transformers' attention
    functions). Key/value heads are repeated first when their number does not divide by the
    sequence-parallel size (see :func:`kv_repeats_for_sequence_parallel`).

    Returns:
        ``q``, ``k``, ``v`` holding ``H/sp`` heads (and the matching kv heads) of the whole
        sequence.
    """
    sp = get_sequence_parallel_world_size()
    if sp == 1:
        return query_states, key_states, value_states
    check_heads_for_sequence_parallel(query_states.shape[scatter_dim], sp)
    repeats = kv_repeats_for_sequence_parallel(key_states.shape[scatter_dim], sp)
    key_states = _repeat_heads(key_states, repeats, scatter_dim)
    value_states = _repeat_heads(value_states, repeats, scatter_dim)
    group = get_sequence_parallel_group()
    return tuple(
        all_to_all(t, group, scatter_dim=scatter_dim, gather_dim=gather_dim)
        for t in (query_states, key_states, value_states)
    )


def post_process_for_sequence_parallel_attn(
    attn_output: Tensor, scatter_dim: int = 1, gather_dim: int = 2
) -> Tensor:
    """Head shards of the whole sequence -> all heads of this rank's sequence shard.

    The defaults take ``[B, S, H/sp, D]`` (what attention functions return) to
    ``[B, S/sp, H, D]``.
    """
    if get_sequence_parallel_world_size() == 1:
        return attn_output
    return all_to_all(
        attn_output, get_sequence_parallel_group(), scatter_dim=scatter_dim, gather_dim=gather_dim
    )
