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
