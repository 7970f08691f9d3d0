"""``framework = 'huggingface'`` configs: ``xtuner train`` trains them through the HF Trainer
with the fork's loss and its global token normalisation."""

from __future__ import annotations

import json
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

from tests.tools.test_train_cli import run_xtuner
from xtuner.engine.runner.loops import attach_loss_denominators
from xtuner.entry_point import cli
from xtuner.model import SupervisedFinetune
from xtuner.tools.train_hf import TrainerModel

#: shaped as XTuner 0.2.0's internlm_7b_qlora_oasst1_e3_hf (QLoRA through the HF Trainer),
#: on the tiny demo model and data; ``loss`` is the fork's key.
HF_CONFIG = """
import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer,
                          TrainingArguments)

from xtuner.dataset import process_hf_dataset
from xtuner.dataset.map_fns import alpaca_map_fn, template_map_fn_factory
from xtuner.utils import PROMPT_TEMPLATE

framework = 'huggingface'
pretrained_model_name_or_path = '{model}'
dataset_name_or_path = '{data}'
max_length = 128
pack_to_max_length = True
prompt_template = PROMPT_TEMPLATE.default

trainer = Trainer

training_args = dict(
    type=TrainingArguments,
    do_train=True,
    learning_rate=2e-2,
    weight_decay=0,
    lr_scheduler_type='constant',
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    max_steps=30,
    fp16=True,
    logging_steps=1,
    optim='paged_adamw_32bit',
    save_strategy='steps',
    save_steps=1000,
    report_to='none',
    ddp_find_unused_parameters=False)

tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    trust_remote_code=True,
    padding_side='right')

model = dict(
    type=AutoModelForCausalLM.from_pretrained,
    pretrained_model_name_or_path=pretrained_model_name_or_path,
    trust_remote_code=True,
    torch_dtype=torch.float16,
    quantization_config=dict(
        type=BitsAndBytesConfig,
        load_in_4bit=True,
        load_in_8bit=False,
        llm_int8_threshold=6.0,
        llm_int8_has_fp16_weight=False,
        bnb_4bit_compute_dtype=torch.float16,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type='nf4'))

lora = dict(
    type=LoraConfig,
    r=16,
    lora_alpha=16,
    lora_dropout=0.1,
    bias='none',
    task_type='CAUSAL_LM')

train_dataset = dict(
    type=process_hf_dataset,
    dataset=dict(type=load_dataset, path='json', data_files=dict(train=dataset_name_or_path)),
    tokenizer=tokenizer,
    max_length=max_length,
    dataset_map_fn=alpaca_map_fn,
    template_map_fn=dict(type=template_map_fn_factory, template=prompt_template),
    remove_unused_columns=True,
    shuffle_before_pack=True,
    pack_to_max_length=pack_to_max_length)
"""


@pytest.mark.slow
def test_hf_trainer_config_trains_its_qlora_adapter(tmp_path, demo_assets):
    cfg = tmp_path / "hf_cfg.py"
    cfg.write_text(HF_CONFIG.format(model=demo_assets["model"], data=demo_assets["data"]))
    work_dir = str(tmp_path / "work")
    out = run_xtuner("train", str(cfg), "--work-dir", work_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    logs = out.stdout + out.stderr
    assert "training_args.fp16 needs a GPU" in logs and "using adamw_torch" in logs
    with open(osp.join(work_dir, "trainer_state.json"), encoding="utf-8") as f:
        losses = [r["loss"] for r in json.load(f)["log_history"] if "loss" in r]
    assert len(losses) == 30
    # A LoRA adapter on a tiny random model learns slowly: from ln(vocab) = 6.9 to about 6.5.
    assert sum(losses[-10:]) / 10 < sum(losses[:3]) / 3 - 0.15
    assert osp.exists(osp.join(work_dir, "hf", "adapter_config.json"))
    assert osp.exists(osp.join(work_dir, "hf", "tokenizer_config.json"))


def test_what_the_hf_trainer_path_does_not_support_says_so(tmp_path, demo_assets, capsys):
    cfg = tmp_path / "hf_cfg.py"
    cfg.write_text(HF_CONFIG.format(model=demo_assets["model"], data=demo_assets["data"]))
    assert cli(["train", str(cfg), "--deepspeed", "deepspeed_zero2"]) == 1
    err = capsys.readouterr().err
    assert "--deepspeed is not supported with framework='huggingface'" in err
    assert "training_args.deepspeed" in err
    cfg.write_text(cfg.read_text() + "sequence_parallel_size = 2\n")
    assert cli(["train", str(cfg)]) == 1
    assert "sequence_parallel_size > 1 is not supported" in capsys.readouterr().err
    cfg.write_text(cfg.read_text().replace("framework = 'huggingface'", "framework = 'hf'"))
    assert cli(["train", str(cfg)]) == 1
    assert "framework='hf'; use 'mmengine'" in capsys.readouterr().err


def test_trainer_model_gives_the_global_token_mean_over_the_window(tiny_llama_path):
    """Two micro-batches of unequal token counts, each divided by the window's length (as
    the Trainer does): the gradient is that of the token mean over both, from HF's logits."""
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    model = TrainerModel(SupervisedFinetune(llm, use_activation_checkpointing=False))
    g = torch.Generator().manual_seed(0)
    batches = []
    for n_valid in (3, 17):
        ids = torch.randint(3, 200, (1, 20), generator=g)
        labels = ids.clone()
        labels[:, : 20 - n_valid] = -100
        batches.append({"input_ids": ids, "labels": labels})
    attach_loss_denominators(model.sft, batches, len(batches))
    for batch in batches:
        (model(**batch)["loss"] / len(batches)).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total, count = 0.0, 0
    for batch in batches:
        logits = model.sft.llm(input_ids=batch["input_ids"]).logits[0, :-1]
        targets = batch["labels"][0, 1:]
        total = total + F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    (total / count).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-5, atol=1e-6, msg=name)
