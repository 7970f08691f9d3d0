"""`xtuner train` on the MOSS, intern-repo and RefCOCO data families: upstream-style configs
(the template's PART 3 swapped for the one of upstream's ``*_moss_sft_*``,
``internlm2_7b_w_tokenized_dataset`` and ``*_finetune_refcoco`` configs), the loss falls."""

from __future__ import annotations

import json

import pytest

from tests.tools.test_config_matrix import (
    matrix_assets,  # noqa: F401  (a fixture)
    write_matrix_config,
)
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


REFCOCO_PART_3 = """
from xtuner.dataset import ConcatDataset
from xtuner.dataset.refcoco_json import InvRefCOCOJsonDataset, RefCOCOJsonDataset

refcoco_path = '{refcoco}'
dataset_args = dict(
    data_path=refcoco_path,
    image_folder=image_folder,
    tokenizer=tokenizer,
    image_processor=image_processor,
    dataset_map_fn=llava_map_fn,
    template_map_fn=dict(
        type=template_map_fn_factory, template=prompt_template),
    max_length=max_length,
    pad_image_to_square=True)
train_dataset = dict(
    type=ConcatDataset,
    datasets=[
        dict(type=RefCOCOJsonDataset, **dataset_args),
        dict(type=InvRefCOCOJsonDataset, **dataset_args),
    ])
train_dataloader['dataset'] = train_dataset
"""


@pytest.mark.slow_all
def test_refcoco_config_trains_and_loss_falls(tmp_path, matrix_assets):  # noqa: F811
    """Upstream's RefCOCO finetune: grounding and inverse grounding data, LLaVA."""
    from xtuner.demo.llava import COLORS, SHAPES

    records = []
    for color in COLORS:
        for shape in SHAPES:
            # draw_shape's box on its 48 x 40 image: a sixth of each side in from the edges
            records.append(
                {
                    "id": f"refcoco-{color}-{shape}",
                    "image": f"{color}_{shape}.png",
                    "sents": f"the {color} {shape}",
                    "bbox": [8.0, 6.0, 32.0, 28.0],
                    "height": 40,
                    "width": 48,
                }
            )
    refcoco = tmp_path / "refcoco.json"
    refcoco.write_text(json.dumps(records))
    cfg = write_matrix_config(tmp_path, matrix_assets, "full", "llava", "default")
    with open(cfg, encoding="utf-8") as f:
        text = f.read().replace("max_iters = 2\n", "max_iters = 30\n")
    # the LLaVA data file is gone: the run trains on the RefCOCO data sets or fails
    text = text.replace("data_root + '/finetune.jsonl'", "data_root + '/no_such_file.jsonl'")
    text = text.replace("lr = 2e-4\n", "lr = 2e-3\n") + "\nparam_scheduler = []\n"
    with open(cfg, "w", encoding="utf-8") as f:
        f.write(text + REFCOCO_PART_3.format(refcoco=refcoco))
    work_dir = str(tmp_path / "work")
    out = run_xtuner("train", cfg, "--work-dir", work_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    losses = losses_of(work_dir)
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
