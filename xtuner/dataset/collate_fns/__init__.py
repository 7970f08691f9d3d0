"""Batch builders for the training data loader."""

from .default_collate_fn import default_collate_fn

__all__ = ["default_collate_fn"]
