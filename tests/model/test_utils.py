"""The attention implementation an llm config gets (prepare_llm_config), and what the model
built from it runs: flash-attention only on a GPU with flash-attn, a 16-bit dtype and a model
class that supports it; otherwise transformers' choice (sdpa, else eager: Gemma2)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

import xtuner._compat
from xtuner.model import SupervisedFinetune
from xtuner.model.utils import prepare_llm_config

SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def llm_config(family: str, **extra) -> dict:
    config = getattr(transformers, family)(**SMALL)
    return dict(type=AutoModelForCausalLM.from_config, config=config, **extra)


@pytest.mark.parametrize(
    ("family", "dtype", "flash_usable", "expected"),
    [
        ("LlamaConfig", "bfloat16", True, "flash_attention_2"),
        ("LlamaConfig", "float32", True, None),  # flash-attention needs 16-bit
        ("LlamaConfig", "bfloat16", False, None),  # no GPU or no flash-attn
        ("Gemma2Config", "bfloat16", True, "flash_attention_2"),
    ],
)
def test_flash_attention_is_chosen_only_where_it_runs(
    monkeypatch, family, dtype, flash_usable, expected
):
    monkeypatch.setattr(xtuner._compat, "flash_attn_available", lambda: flash_usable)
    cfg = prepare_llm_config(llm_config(family, dtype=dtype))
    assert cfg.get("attn_implementation") == expected
    # The user's choice is kept.
    cfg = prepare_llm_config(llm_config(family, dtype=dtype, attn_implementation="eager"))
    assert cfg["attn_implementation"] == "eager"


@pytest.mark.parametrize(("family", "kernel"), [("LlamaConfig", "sdpa"), ("Gemma2Config", "eager")])
def test_without_flash_the_family_gets_a_kernel_it_supports(family, kernel):
    model = SupervisedFinetune(
        llm_config(family, dtype=torch.float32), use_activation_checkpointing=False
    )
    assert model.llm.config._attn_implementation == kernel
