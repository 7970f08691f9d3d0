"""Evaluation for ``xtuner test``: multiple-choice (MMLU-style) data and its accuracy metric."""

from .mmlu import MMLUDataset, MMLUMetric, mmlu_collate_fn

__all__ = ["MMLUDataset", "MMLUMetric", "mmlu_collate_fn"]
