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
