"""A tiny DeepSeek-V2 (transformers' own classes, router logits on) trains through
``xtuner train`` from a config written as XTuner 0.2.0's DeepSeek-V2 configs are."""

from __future__ import annotations

import glob
import json
import os.path as osp
import shutil

import pytest
import torch
import transformers

from tests.tools.test_train_cli import CONSTANT_LR, losses_of, run_xtuner, write_config
from xtuner.model.transformers_models.deepseek_v2 import DeepseekV2ForCausalLM

#: the model part of upstream's deepseek_v2_lite_chat_full_alpaca_e3 (full fine-tuning).
DEEPSEEK_PART = """
from xtuner.model.transformers_models.deepseek_v2 import DeepseekV2ForCausalLM

model = dict(
    type=SupervisedFinetune,
    use_varlen_attn=use_varlen_attn,
    llm=dict(
        type=DeepseekV2ForCausalLM.from_pretrained,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        moe_implementation='shard',
        expert_in_one_shard=8,
        trust_remote_code=True))
optim_wrapper['optimizer'].update(lr=1e-2)
"""


@pytest.fixture(scope="module")
def tiny_deepseek_v2(demo_assets, tmp_path_factory) -> str:
    """A DeepSeek-V2 checkpoint as DeepSeek writes it (``aux_loss_alpha``), demo tokenizer."""
    path = str(tmp_path_factory.mktemp("deepseek_v2") / "model")
    shutil.copytree(demo_assets["tokenizer"], path)
    with open(osp.join(demo_assets["model"], "config.json"), encoding="utf-8") as f:
        vocab = json.load(f)["vocab_size"]
    config = transformers.DeepseekV2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        max_position_embeddings=256,
        aux_loss_alpha=0.01,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    DeepseekV2ForCausalLM(config).save_pretrained(path)
    return path


@pytest.mark.slow
def test_deepseek_v2_config_trains_with_its_router_loss(tmp_path, demo_assets, tiny_deepseek_v2):
    assets = dict(demo_assets, model=tiny_deepseek_v2)
    cfg = write_config(tmp_path, assets, max_iters=20, param_scheduler=CONSTANT_LR)
    with open(cfg, "a", encoding="utf-8") as f:
        f.write(DEEPSEEK_PART)
    work_dir = str(tmp_path / "work")
    out = run_xtuner("train", cfg, "--work-dir", work_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'moe_implementation': 'shard', 'expert_in_one_shard': 8} ignored" in out.stdout
    losses = losses_of(work_dir)
    assert len(losses) == 20
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    scalars = sorted(glob.glob(osp.join(work_dir, "2*", "vis_data", "scalars.json")))
    with open(scalars[-1], encoding="utf-8") as f:
        aux = [json.loads(line)["loss_router_aux"] for line in f if "loss_router_aux" in line]
    assert len(aux) == 20 and all(a > 0 for a in aux)
