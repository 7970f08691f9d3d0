"""Samplers that order training samples (``DefaultSampler`` comes from mmengine)."""

from .intern_repo import InternRepoSampler
from .length_grouped import LengthGroupedSampler, get_length_grouped_indices

__all__ = ["LengthGroupedSampler", "InternRepoSampler", "get_length_grouped_indices"]
