"""Model building blocks: attention functions for sequence parallel."""

from .sequence_parallel_attention import (
    enable_sequence_parallel_attention,
    register_sequence_parallel_attention,
)

__all__ = ["enable_sequence_parallel_attention", "register_sequence_parallel_attention"]
