"""process_ms_dataset: a clear error without ModelScope; HF data passes through."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from datasets import Dataset

from xtuner.dataset import process_ms_dataset


def test_missing_modelscope_says_how_to_install(monkeypatch):
    # As on a machine without the extra, also where it is installed (CI installs [all]).
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(ImportError, match="pip install modelscope"):
        process_ms_dataset(dict(type="modelscope.MsDataset.load", dataset_name="x"))


def test_hugging_face_data_is_processed(tokenizer):
    data = Dataset.from_list([{"conversation": [{"input": "q", "output": "a"}]}])
    out = process_ms_dataset(data, tokenizer=tokenizer, max_length=16, pack_to_max_length=False)
    assert len(out) == 1 and out[0]["length"] == len(out[0]["input_ids"])


# About 20 s of CPU: make test-all only (the CI budget of issue 15).
@pytest.mark.slow_all
@pytest.mark.skipif(
    importlib.util.find_spec("modelscope") is None,
    reason="the modelscope extra (in [all], so CI has it) is not installed",
)
def test_msagent_style_config_trains_through_modelscope(tmp_path, demo_assets):
    """XTuner 0.2.0's msagent configs: ``process_ms_dataset`` over ``MsDataset.load`` (here
    of a local JSON-lines file, as no hub is reachable)."""
    from tests.tools.test_train_cli import losses_of, run_xtuner, write_config

    header = (
        "from modelscope.msdatasets import MsDataset\nfrom xtuner.dataset import process_ms_dataset"
    )
    cfg = write_config(tmp_path, demo_assets, max_iters=3, header=header)
    path = Path(cfg)
    text = path.read_text(encoding="utf-8")
    text = text.replace("type=process_hf_dataset,", "type=process_ms_dataset,").replace(
        "dataset=dict(type=load_dataset, path='json', data_files=dict(train=alpaca_en_path))",
        "dataset=dict(type=MsDataset.load, dataset_name='json', data_files=alpaca_en_path)",
    )
    assert "MsDataset.load, dataset_name='json'" in text
    path.write_text(text, encoding="utf-8")
    work_dir = str(tmp_path / "work")
    env = {"MODELSCOPE_CACHE": str(tmp_path / "ms_cache")}
    out = run_xtuner("train", cfg, "--work-dir", work_dir, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(losses_of(work_dir)) == 3
