"""ConcatDataset builds config entries and reads as one data set."""

from __future__ import annotations

import pytest
from datasets import Dataset

from xtuner.dataset import ConcatDataset, process_hf_dataset
from xtuner.dataset.map_fns import template_map_fn_factory
from xtuner.utils import PROMPT_TEMPLATE


def test_mixes_configs_and_built_datasets(tokenizer):
    records = [{"conversation": [{"input": f"q{i}", "output": f"a{i}"}]} for i in range(6)]
    cfg = dict(
        type=process_hf_dataset,
        dataset=Dataset.from_list(records),
        tokenizer=tokenizer,
        max_length=64,
        template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.default),
        pack_to_max_length=False,
    )
    built = Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[1, 2]], "length": [2]})
    data = ConcatDataset([cfg, built])
    assert len(data) == 7
    assert data[6]["input_ids"] == [1, 2]
    assert data[0]["input_ids"][0] == tokenizer.bos_token_id
    assert "ConcatDataset(" in repr(data)
    with pytest.raises(ValueError):
        ConcatDataset([])
