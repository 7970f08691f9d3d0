"""Data sets for fine-tuning: processing, concatenation, collate functions and samplers."""

from .concat_dataset import ConcatDataset
from .huggingface import process_hf_dataset
from .llava import LLaVADataset, expand2square
from .modelscope import process_ms_dataset
from .utils import encode_fn

__all__ = [
    "process_hf_dataset",
    "process_ms_dataset",
    "ConcatDataset",
    "LLaVADataset",
    "expand2square",
    "encode_fn",
]
