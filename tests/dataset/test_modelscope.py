"""process_ms_dataset: a clear error without ModelScope; HF data passes through."""

from __future__ import annotations

import importlib.util

import pytest
from datasets import Dataset

from xtuner.dataset import process_ms_dataset


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is not None, reason="installed")
def test_missing_modelscope_says_how_to_install():
    with pytest.raises(ImportError, match="pip install modelscope"):
        process_ms_dataset(dict(type="modelscope.MsDataset.load", dataset_name="x"))


def test_hugging_face_data_is_processed(tokenizer):
    data = Dataset.from_list([{"conversation": [{"input": "q", "output": "a"}]}])
    out = process_ms_dataset(data, tokenizer=tokenizer, max_length=16, pack_to_max_length=False)
    assert len(out) == 1 and out[0]["length"] == len(out[0]["input_ids"])
