"""`xtuner process_untokenized_datasets`: pre-tokenised data trains exactly like on-the-fly."""

from __future__ import annotations

import re

from mmengine.config import Config

from tests.tools.test_train_cli import write_config
from xtuner.entry_point import cli
from xtuner.registry import BUILDER


def _pretokenised_config(cfg_path: str, folder: str) -> str:
    """The config with only its data set part changed, as the tool's help says."""
    with open(cfg_path, encoding="utf-8") as f:
        text = f.read()
    changes = [
        (
            r"dataset=dict\(type=load_dataset, path='json', "
            r"data_files=dict\(train=alpaca_en_path\)\),",
            f"dataset=dict(type=load_from_disk, dataset_path={folder!r}),\n"
            "    do_dataset_tokenization=False, max_dataset_length=None,",
        ),
        (r"dataset_map_fn=alpaca_map_fn,", "dataset_map_fn=None,"),
        (
            r"template_map_fn=dict\(\s*type=template_map_fn_factory, template=prompt_template\),",
            "template_map_fn=None,",
        ),
    ]
    for pattern, new in changes:
        text, count = re.subn(pattern, new, text)
        assert count == 1, pattern
    text = "from datasets import load_from_disk\n" + text
    path = cfg_path.replace(".py", "_pretokenised.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def test_pretokenised_data_equals_on_the_fly_processing(tmp_path, demo_assets, capsys, monkeypatch):
    monkeypatch.setenv("XTUNER_DATASET_CACHE", "none")  # both paths really process
    cfg_path = write_config(tmp_path, demo_assets)
    folder = str(tmp_path / "tokenised")
    assert cli(["process_untokenized_datasets", cfg_path, "--save-folder", folder]) == 0
    assert "saved 2000 tokenised samples" in capsys.readouterr().out

    on_the_fly = BUILDER.build(Config.fromfile(cfg_path).train_dataloader.dataset)
    pre = BUILDER.build(
        Config.fromfile(_pretokenised_config(cfg_path, folder)).train_dataloader.dataset
    )
    assert len(pre) == len(on_the_fly) > 100
    assert pre.column_names == on_the_fly.column_names
    for i in range(len(pre)):
        assert pre[i] == on_the_fly[i], f"packed sample {i} differs"

    # A second run does not overwrite the folder.
    assert cli(["process_untokenized_datasets", cfg_path, "--save-folder", folder]) == 1
    assert "exists; give a new folder" in capsys.readouterr().err


def test_pretokenised_llava_text_gives_the_same_samples(tmp_path, capsys, monkeypatch):
    import copy

    import torch

    monkeypatch.setenv("XTUNER_DATASET_CACHE", "none")
    name = "llava_tiny_llama_tiny_clip_lora_e10_cpu_finetune"
    folder = str(tmp_path / "llava_text")
    assert cli(["process_untokenized_llava_data", name, "--save-folder", folder]) == 0
    assert "saved the text of 16 samples" in capsys.readouterr().out

    from xtuner.configs import cfgs_name_path

    dataset_cfg = Config.fromfile(cfgs_name_path[name]).train_dataloader.dataset
    offline_cfg = copy.deepcopy(dataset_cfg)
    offline_cfg.offline_processed_text_folder = folder
    offline_cfg.data_path = None
    on_the_fly, offline = BUILDER.build(dataset_cfg), BUILDER.build(offline_cfg)
    assert len(offline) == len(on_the_fly) == 16
    assert offline.modality_length == on_the_fly.modality_length
    for i in range(len(offline)):
        ours, theirs = offline[i], on_the_fly[i]
        assert ours["input_ids"] == theirs["input_ids"] and ours["labels"] == theirs["labels"]
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"]), i

    # A text-only config is refused, naming what the tool handles.
    assert (
        cli(
            [
                "process_untokenized_llava_data",
                "demo_tiny_llama_full_alpaca",
                "--save-folder",
                str(tmp_path / "x"),
            ]
        )
        == 1
    )
    assert "pre-tokenises LLaVADataset data sets only" in capsys.readouterr().err
