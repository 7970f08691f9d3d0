"""``process_ms_dataset``: ``process_hf_dataset`` for data sets loaded through ModelScope."""

from __future__ import annotations

from xtuner.registry import BUILDER

from .huggingface import process_hf_dataset
from .utils import is_config


def _require_modelscope() -> None:
    try:
        import modelscope  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "process_ms_dataset loads data through ModelScope, which is not installed: "
            "pip install 'xtuner[modelscope]' (or pip install modelscope)"
        ) from e


def process_ms_dataset(dataset, split: str | None = "train", *args, **kwargs):
    """Builds a ModelScope data set (``MsDataset``), converts it and runs ``process_hf_dataset``.

    Args:
        dataset: an ``MsDataset``, a config that loads one (e.g.
            ``dict(type=MsDataset.load, dataset_name=...)``), or a Hugging Face data set.
        split: the split to take when the data set has several.
        *args: passed to ``process_hf_dataset`` after ``dataset``.
        **kwargs: passed to ``process_hf_dataset``.

    Returns:
        What ``process_hf_dataset`` returns.
    """
    if is_config(dataset):
        _require_modelscope()
        dataset = BUILDER.build(dataset)
    if type(dataset).__module__.startswith("modelscope"):
        _require_modelscope()
    if split is not None and not hasattr(dataset, "to_hf_dataset") and hasattr(dataset, "keys"):
        dataset = dataset[split]
    if hasattr(dataset, "to_hf_dataset"):
        dataset = dataset.to_hf_dataset()
    return process_hf_dataset(dataset, *args, split=split, **kwargs)
