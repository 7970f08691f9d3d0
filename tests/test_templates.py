"""PROMPT_TEMPLATE / SYSTEM_TEMPLATE contents, and template_map_fn rendering every template."""

from __future__ import annotations

import copy
import pickle
import string

import pytest

from xtuner.dataset.map_fns import pretrain_map_fn, template_map_fn, template_map_fn_factory
from xtuner.utils import (
    DEFAULT_IMAGE_TOKEN,
    DEFAULT_PAD_TOKEN_INDEX,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    PROMPT_TEMPLATE,
    SYSTEM_TEMPLATE,
)

PROMPT_KEYS = {
    "default",
    "zephyr",
    "internlm_chat",
    "internlm2_chat",
    "moss_sft",
    "llama2_chat",
    "code_llama_chat",
    "chatglm2",
    "chatglm3",
    "qwen_chat",
    "baichuan_chat",
    "baichuan2_chat",
    "wizardlm",
    "wizardcoder",
    "vicuna",
    "deepseek_coder",
    "deepseekcoder",
    "deepseek_moe",
    "deepseek_v2",
    "mistral",
    "mixtral",
    "minicpm",
    "minicpm3",
    "gemma",
    "cohere_chat",
    "llama3_chat",
    "deepseek_r1",
    "phi3_chat",
}
SYSTEM_KEYS = {
    "moss_sft",
    "alpaca",
    "arxiv_gentile",
    "colorist",
    "coder",
    "lawyer",
    "medical",
    "sql",
}
FIELDS = {"SYSTEM", "INSTRUCTION", "SUFFIX", "SUFFIX_AS_EOS", "SEP", "STOP_WORDS"}


def placeholders(fmt: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}


def two_turns() -> dict:
    return {
        "conversation": [
            {"system": "Be brief.", "input": "Hi {there}", "output": "Hello."},
            {"input": "2+2?", "output": "4"},
        ]
    }


def render(conversation: list[dict], eos: str = "</s>") -> str:
    """The text the encoder would see: input, output, EOS when needed, then the separator."""
    return "".join(
        t["input"] + t["output"] + (eos if t["need_eos_token"] else "") + t["sep"]
        for t in conversation
    )


def test_constants():
    assert (IGNORE_INDEX, DEFAULT_PAD_TOKEN_INDEX, IMAGE_TOKEN_INDEX) == (-100, 0, -200)
    assert DEFAULT_IMAGE_TOKEN == "<image>"


def test_prompt_template_keys():
    assert set(PROMPT_TEMPLATE) == PROMPT_KEYS
    assert len(PROMPT_TEMPLATE) == 28  # the 27 of XTuner 0.x and deepseek_r1


def test_system_template_keys():
    assert set(SYSTEM_TEMPLATE) == SYSTEM_KEYS
    for key, text in SYSTEM_TEMPLATE.items():
        assert isinstance(text, str) and len(text) > 20, key
        assert text == text.strip(), key
    # Attribute access is what configs use.
    assert SYSTEM_TEMPLATE.alpaca == SYSTEM_TEMPLATE["alpaca"]


@pytest.mark.parametrize("name", sorted(PROMPT_KEYS))
def test_template_fields(name):
    template = PROMPT_TEMPLATE[name]
    assert set(template) <= FIELDS, set(template) - FIELDS
    assert placeholders(template.SYSTEM) == {"system"}
    assert "input" in placeholders(template.INSTRUCTION)
    assert placeholders(template.INSTRUCTION) <= {"input", "round"}
    if "SUFFIX" in template:
        assert isinstance(template.SUFFIX, str) and template.SUFFIX
        assert template.SUFFIX.strip() in template.STOP_WORDS
    if template.get("SUFFIX_AS_EOS"):
        assert "SUFFIX" in template, "a suffix that ends the turn needs a suffix"
    assert isinstance(template.get("SUFFIX_AS_EOS", False), bool)
    assert isinstance(template.get("SEP", ""), str)
    stop_words = template.get("STOP_WORDS", [])
    assert isinstance(stop_words, list)
    assert all(isinstance(word, str) and word for word in stop_words)


@pytest.mark.parametrize("name", sorted(PROMPT_KEYS))
def test_every_template_renders_two_turns(name):
    template = PROMPT_TEMPLATE[name]
    example = two_turns()
    original = copy.deepcopy(example)
    turns = template_map_fn(example, template)["conversation"]
    assert example == original, "template_map_fn must not modify its input"
    assert len(turns) == 2

    system = template.SYSTEM.format(system="Be brief.")
    first = template.INSTRUCTION.format(input="Hi {there}", round=1)
    second = template.INSTRUCTION.format(input="2+2?", round=2)
    assert turns[0]["input"] == system + first
    assert turns[1]["input"] == second
    assert "Be brief." in turns[0]["input"] and "Be brief." not in turns[1]["input"]
    assert "Hi {there}" in turns[0]["input"]
    suffix = template.get("SUFFIX", "")
    assert [t["output"] for t in turns] == ["Hello." + suffix, "4" + suffix]
    need_eos = not template.get("SUFFIX_AS_EOS", False)
    assert [t["need_eos_token"] for t in turns] == [need_eos, need_eos]
    assert [t["sep"] for t in turns] == [template.get("SEP", "")] * 2


# Whole two-turn samples, written out from each family's published chat format.
EXPECTED_TEXT = {
    "qwen_chat": (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi {there}<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    ),
    "llama3_chat": (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi {there}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    ),
    "phi3_chat": (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi {there}<|end|>\n<|assistant|>\nHello.<|end|>\n"
        "<|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n"
    ),
    "chatglm2": (
        "Be brief.\n\n[Round 1]\n\n问：Hi {there}\n\n答：Hello.</s>\n\n"
        "[Round 2]\n\n问：2+2?\n\n答：4</s>\n\n"
    ),
    "zephyr": (
        "<|system|>\nBe brief.</s>\n<|user|>\nHi {there}</s>\n<|assistant|>\nHello.</s>\n"
        "<|user|>\n2+2?</s>\n<|assistant|>\n4</s>\n"
    ),
    "cohere_chat": (
        "<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi {there}<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello.<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>2+2?<|END_OF_TURN_TOKEN|>"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>4<|END_OF_TURN_TOKEN|>"
    ),
    "deepseek_coder": (
        "Be brief.\n### Instruction:\nHi {there}\n### Response:\nHello.\n<|EOT|>\n"
        "### Instruction:\n2+2?\n### Response:\n4\n<|EOT|>\n"
    ),
    "gemma": (
        "<start_of_turn>system\nBe brief.<end_of_turn>\n"
        "<start_of_turn>user\nHi {there}<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n4<end_of_turn>\n"
    ),
    "llama2_chat": (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n [/INST][INST] Hi {there} [/INST]Hello.</s>"
        "[INST] 2+2? [/INST]4</s>"
    ),
    "vicuna": "Be brief. USER: Hi {there} ASSISTANT:Hello.</s>USER: 2+2? ASSISTANT:4</s>",
    "internlm_chat": (
        "<|System|>:Be brief.\n<|User|>:Hi {there}<eoh>\n<|Bot|>:Hello.<eoa>\n"
        "<|User|>:2+2?<eoh>\n<|Bot|>:4<eoa>\n"
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TEXT))
def test_published_formats(name):
    turns = template_map_fn(two_turns(), PROMPT_TEMPLATE[name])["conversation"]
    assert render(turns) == EXPECTED_TEXT[name]


def test_chatml_families_share_the_format():
    for name in ("internlm2_chat", "minicpm3"):
        turns = template_map_fn(two_turns(), PROMPT_TEMPLATE[name])["conversation"]
        assert render(turns) == EXPECTED_TEXT["qwen_chat"], name


def test_aliases_are_equal():
    assert PROMPT_TEMPLATE.deepseekcoder == PROMPT_TEMPLATE.deepseek_coder
    assert PROMPT_TEMPLATE.mixtral == PROMPT_TEMPLATE.mistral
    assert PROMPT_TEMPLATE.deepseek_v2 == PROMPT_TEMPLATE.deepseek_moe


def test_explicit_no_eos_survives_template():
    example = pretrain_map_fn({"text": " some text \n"})
    turns = template_map_fn(example, PROMPT_TEMPLATE.default)["conversation"]
    assert turns[0]["need_eos_token"] is False
    assert turns[0]["output"] == "some text"


def test_null_fields_from_arrow():
    # Records read back from Arrow carry None for fields other records set.
    example = {
        "conversation": [{"system": None, "input": None, "output": "x", "need_eos_token": None}]
    }
    (turn,) = template_map_fn(example, PROMPT_TEMPLATE.default)["conversation"]
    assert turn["input"] == "<|User|>:\n<|Bot|>:"
    assert turn["need_eos_token"] is True


def test_factory_is_picklable_and_applies_template():
    fn = template_map_fn_factory(PROMPT_TEMPLATE.qwen_chat)
    restored = pickle.loads(pickle.dumps(fn))
    assert restored(two_turns()) == template_map_fn(two_turns(), PROMPT_TEMPLATE.qwen_chat)


def test_factory_accepts_plain_dict():
    fn = template_map_fn_factory(dict(SYSTEM="S:{system}|", INSTRUCTION="Q{round}:{input}|A:"))
    turns = fn(two_turns())["conversation"]
    assert [t["input"] for t in turns] == ["S:Be brief.|Q1:Hi {there}|A:", "Q2:2+2?|A:"]
    assert [t["sep"] for t in turns] == ["", ""]
    assert [t["need_eos_token"] for t in turns] == [True, True]


@pytest.mark.parametrize(
    "template, message",
    [
        (dict(SYSTEM="{system}"), "'INSTRUCTION'"),
        (dict(SYSTEM="{system}", INSTRUCTION="no placeholder"), "{input}"),
        (dict(SYSTEM="plain", INSTRUCTION="{input}"), "{system}"),
        (["qwen_chat"], "must be a dict"),
    ],
)
def test_factory_rejects_broken_templates(template, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
        template_map_fn_factory(template)


def test_factory_takes_a_template_name():
    by_name = template_map_fn_factory("qwen_chat").keywords["template"]
    assert by_name == PROMPT_TEMPLATE.qwen_chat
    with pytest.raises(KeyError, match="Did you mean 'qwen_chat'"):
        template_map_fn_factory("qwen_chta")


def test_template_map_fn_needs_conversation():
    with pytest.raises(ValueError, match="'conversation'"):
        template_map_fn({"text": "raw"}, PROMPT_TEMPLATE.default)
