"""`xtuner train` on the MOSS and intern-repo data families: upstream-style configs (the
template's PART 3 swapped for the one of upstream's ``*_moss_sft_*`` and
``internlm2_7b_w_tokenized_dataset`` configs), the loss falls."""

from __future__ import annotations

import json

import pytest

from tests.tools.test_train_cli import CONSTANT_LR, losses_of, run_xtuner, write_config
from xtuner.entry_point import cli

# PART 3 of upstream's internlm_7b_qlora_moss_sft_all_e1.py, with local files.
MOSS_PART_3 = """
from xtuner.dataset import ConcatDataset, MOSSSFTDataset

bot_name = 'InternLM'
moss_sft_no_plugins_path = '{plain}'
moss_sft_plugins_path = '{plugins}'
moss_sft_no_plugins = dict(
    type=MOSSSFTDataset,
    data_file=moss_sft_no_plugins_path,
    bot_name=bot_name,
    tokenizer=tokenizer,
    max_length=max_length)
moss_sft_plugins = dict(
    type=MOSSSFTDataset,
    data_file=moss_sft_plugins_path,
    bot_name=bot_name,
    tokenizer=tokenizer,
    max_length=max_length)
train_dataset = dict(
    type=ConcatDataset, datasets=[moss_sft_no_plugins, moss_sft_plugins])
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=DefaultSampler, shuffle=True),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn))
"""

# PART 3 of upstream's internlm2_7b_w_tokenized_dataset.py, with a local folder.
INTERN_REPO_PART_3 = """
from torch.utils.data import BatchSampler
from xtuner.dataset.intern_repo import (build_packed_dataset,
                                        load_intern_repo_tokenized_dataset)
from xtuner.dataset.samplers import InternRepoSampler

dataset_folder = '{folder}'
train_dataset = dict(
    type=build_packed_dataset,
    dataset_cfg=dict(
        type=load_intern_repo_tokenized_dataset,
        data_order_path=None,
        folder=dataset_folder,
        min_length=0,
        file_type='.bin'),
    packed_length=max_length,
    seed=1024)
train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(type=InternRepoSampler, shuffle=True, seed=1024),
    batch_sampler=dict(type=BatchSampler, drop_last=True, batch_size=batch_size),
    collate_fn=dict(type=default_collate_fn, use_varlen_attn=use_varlen_attn))
custom_hooks[0] = dict(
    type=DatasetInfoHook, tokenizer=tokenizer, is_intern_repo_dataset=True)
"""


def _alpaca(demo_assets, n: int) -> list[dict]:
    with open(demo_assets["data"], encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f)]


def _train(tmp_path, demo_assets, part_3: str, **options) -> list[float]:
    cfg = write_config(tmp_path, demo_assets, max_iters=30, param_scheduler=CONSTANT_LR, **options)
    with open(cfg, "a", encoding="utf-8") as f:
        f.write(part_3)
    work_dir = str(tmp_path / "work")
    out = run_xtuner("train", cfg, "--work-dir", work_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    losses = losses_of(work_dir)
    assert len(losses) == 30
    return losses


# The MOSS data path is covered in CI by tests/dataset/test_moss_sft.py; this end-to-end run
# would pass the CI time budget, so only `make test-all` runs it.
@pytest.mark.slow_all
def test_moss_config_trains_and_loss_falls(tmp_path, demo_assets):
    meta = "You are an AI assistant whose name is MOSS."
    plain, plugins = [], []
    for r in _alpaca(demo_assets, 200):
        human = f"<|Human|>: {r['instruction']} {r['input']}<eoh>\n"
        reply = f"<|MOSS|>: {r['output']}<eom>\n"
        plain.append(
            {
                "meta_instruction": meta,
                "num_turns": 1,
                "chat": {"turn_1": {"Human": human, "MOSS": reply}},
            }
        )
        tool = {
            "Human": human,
            "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
            "Commands": "<|Commands|>: None<eoc>\n",
            "Tool Responses": f"<|Results|>: {r['input']}<eor>\n",
            "MOSS": reply,
        }
        plugins.append({"meta_instruction": meta, "num_turns": 1, "chat": {"turn_1": tool}})
    paths = {}
    for name, records in (("plain", plain), ("plugins", plugins)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(x) + "\n" for x in records))
    losses = _train(tmp_path, demo_assets, MOSS_PART_3.format(**paths))
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


@pytest.mark.slow
def test_intern_repo_config_trains_and_loss_falls(tmp_path, demo_assets):
    # ftdp data tokenised by the tool, as upstream's guide does it.
    processed = tmp_path / "ftdp" / "alpaca" / "processed"
    processed.mkdir(parents=True)
    lines = [
        [
            {"role": "user", "content": f"{r['instruction']} {r['input']}"},
            {"role": "assistant", "content": r["output"]},
        ]
        for r in _alpaca(demo_assets, 400)
    ]
    (processed / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    tokenized = tmp_path / "tokenized"
    argv = ["tokenize_ftdp_datasets", "--processed-dir", str(tmp_path / "ftdp")]
    argv += ["--tokenized-dir", str(tokenized), "--tokenizer-path", demo_assets["tokenizer"]]
    assert cli([*argv, "--tokenizer-w-special-tokens-save-dir", str(tmp_path / "tok")]) == 0
    folder = tokenized / "chatml_llamav13_32k" / "train"
    losses = _train(
        tmp_path, demo_assets, INTERN_REPO_PART_3.format(folder=folder), use_varlen_attn=True
    )
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
