"""Shared fixtures: a tiny tokenizer and tiny Llama built offline once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> dict[str, str]:
    """Paths of the demo tokenizer, tiny Llama (fp32, random) and demo data."""
    from xtuner.demo import prepare_demo

    return prepare_demo(str(tmp_path_factory.mktemp("demo_assets")))


@pytest.fixture(scope="session")
def tokenizer(demo_assets):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_assets["tokenizer"])


@pytest.fixture(scope="session")
def tiny_llama_path(demo_assets) -> str:
    return demo_assets["model"]


@pytest.fixture(scope="session")
def internvl_path(demo_assets, tmp_path_factory) -> str:
    """A tiny native InternVL checkpoint (InternVL vision tower on 32x32 tiles giving 4
    features each, tiny Qwen2, the demo tokenizer with the image tokens)."""
    from xtuner.demo.internvl import build_tiny_internvl

    folder = tmp_path_factory.mktemp("internvl") / "model"
    return build_tiny_internvl(str(folder), demo_assets["tokenizer"])


CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def chat_model_path(demo_assets, tmp_path_factory) -> str:
    """The tiny Llama with a tokenizer that has a (ChatML) chat template, as chat models do
    (the preference data is rendered with the tokenizer's chat template)."""
    import shutil

    from transformers import AutoTokenizer

    path = str(tmp_path_factory.mktemp("chat_model") / "model")
    shutil.copytree(demo_assets["model"], path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """transformers' flex path with torch's flex_attention and create_block_mask uncompiled:
    the same BlockMask and the same mathematics (torch's reference implementation) without
    the CPU compile (15-30 s per shape), whose torch 2.13 CPU kernel is also wrong at some
    lengths (8 tokens with a causal mask); the compiled kernel is the GPU check's. Returns
    the masks flex received."""
    import warnings

    import transformers.integrations.flex_attention as flex_integration
    import transformers.masking_utils as masking_utils
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    def flex(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    def block_mask(*args, _compile=False, **kwargs):
        return create_block_mask(*args, **kwargs)

    monkeypatch.setattr(flex_integration, "compile_friendly_flex_attention", flex)
    monkeypatch.setattr(masking_utils, "create_block_mask", block_mask)
    masks = []
    kernel = ALL_ATTENTION_FUNCTIONS["flex_attention"]

    def recording_flex(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return kernel(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention", recording_flex)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")
        yield masks
