"""Dataset map functions: exact conversations, multi-turn grouping, flags, bad records."""

from __future__ import annotations

import json

import pytest

import xtuner.dataset.map_fns as map_fns
from xtuner.dataset.map_fns import (
    alpaca_map_fn,
    alpaca_zh_map_fn,
    arxiv_map_fn,
    code_alpaca_map_fn,
    colors_map_fn,
    crime_kg_assitant_map_fn,
    default_map_fn,
    law_reference_map_fn,
    llava_image_only_map_fn,
    llava_map_fn,
    medical_map_fn,
    msagent_react_map_fn,
    oasst1_map_fn,
    openai_map_fn,
    openorca_map_fn,
    pretrain_map_fn,
    sql_map_fn,
    stack_exchange_map_fn,
    template_map_fn_factory,
    tiny_codes_map_fn,
    wizardlm_map_fn,
)
from xtuner.registry import MAP_FUNC
from xtuner.utils import PROMPT_TEMPLATE, SYSTEM_TEMPLATE

MAP_FN_NAMES = [
    "alpaca_map_fn",
    "alpaca_zh_map_fn",
    "oasst1_map_fn",
    "openai_map_fn",
    "pretrain_map_fn",
    "code_alpaca_map_fn",
    "arxiv_map_fn",
    "colors_map_fn",
    "crime_kg_assitant_map_fn",
    "law_reference_map_fn",
    "medical_map_fn",
    "sql_map_fn",
    "tiny_codes_map_fn",
    "openorca_map_fn",
    "msagent_react_map_fn",
    "wizardlm_map_fn",
    "stack_exchange_map_fn",
    "default_map_fn",
    "llava_map_fn",
    "llava_image_only_map_fn",
]


def conv(*turns: dict) -> dict:
    return {"conversation": list(turns)}


@pytest.mark.parametrize("name", MAP_FN_NAMES)
def test_registered_and_exported(name):
    fn = getattr(map_fns, name)
    assert MAP_FUNC.get(name) is fn
    assert name in map_fns.__all__


# ----------------------------------------------------------------------------- single turn


def test_alpaca_with_and_without_input():
    rec = {"instruction": "Reverse the word.", "input": "rocket", "output": "tekcor"}
    assert alpaca_map_fn(rec) == conv(
        {"system": SYSTEM_TEMPLATE.alpaca, "input": "Reverse the word.\nrocket", "output": "tekcor"}
    )
    for empty in ("", None):
        rec = {"instruction": "Say hi.", "input": empty, "output": "hi"}
        assert alpaca_map_fn(rec)["conversation"][0]["input"] == "Say hi."
    assert alpaca_map_fn({"instruction": "Say hi.", "output": "hi"})["conversation"][0][
        "input"
    ] == ("Say hi.")


def test_alpaca_nooutput_gives_empty_conversation():
    assert alpaca_map_fn({"instruction": "x", "input": "", "output": "<nooutput>"}) == conv()


def test_alpaca_zh():
    rec = {"instruction_zh": "翻译", "input_zh": "cat", "output_zh": "猫", "output": "ignored"}
    assert alpaca_zh_map_fn(rec) == conv(
        {"system": SYSTEM_TEMPLATE.alpaca, "input": "翻译\ncat", "output": "猫"}
    )


def test_single_turn_loss_weight_passes_through():
    rec = {"instruction": "a", "input": "", "output": "b", "loss_weight": 3}
    assert alpaca_map_fn(rec)["conversation"][0]["loss_weight"] == 3.0
    rec["loss_weight"] = None  # Arrow null: this record did not set one
    assert alpaca_map_fn(rec)["conversation"][0]["loss_weight"] == 1.0
    assert "loss_weight" not in default_map_fn({"input": "a", "output": "b"})["conversation"][0]


SINGLE_TURN_CASES = [
    (code_alpaca_map_fn, {"prompt": "p", "completion": "c"}, "coder", "p", "c"),
    (tiny_codes_map_fn, {"prompt": "p", "response": "r"}, "coder", "p", "r"),
    (
        arxiv_map_fn,
        {"abstract": "We study X.", "title": "On X"},
        "arxiv_gentile",
        "We study X.",
        "On X",
    ),
    (
        colors_map_fn,
        {"description": "deep sky", "color": "#00bfff"},
        "colorist",
        "deep sky",
        "#00bfff",
    ),
    (crime_kg_assitant_map_fn, {"input": "q", "output": "a"}, "lawyer", "q", "a"),
    (law_reference_map_fn, {"question": "q", "answer": "a"}, "lawyer", "q", "a"),
    (
        medical_map_fn,
        {"instruction": "头痛怎么办", "input": "三天了", "output": "休息"},
        "medical",
        "头痛怎么办\n三天了",
        "休息",
    ),
    (medical_map_fn, {"instruction": "i", "input": "", "output": "o"}, "medical", "i", "o"),
    (
        sql_map_fn,
        {
            "context": "CREATE TABLE t (a INT)",
            "question": "count rows",
            "answer": "SELECT COUNT(*) FROM t",
        },
        "sql",
        "CREATE TABLE t (a INT)\ncount rows",
        "SELECT COUNT(*) FROM t",
    ),
]


@pytest.mark.parametrize("fn, rec, system_key, expected_input, expected_output", SINGLE_TURN_CASES)
def test_single_turn_with_system(fn, rec, system_key, expected_input, expected_output):
    assert fn(rec) == conv(
        {
            "system": SYSTEM_TEMPLATE[system_key],
            "input": expected_input,
            "output": expected_output,
        }
    )


def test_openorca():
    rec = {"id": "1", "system_prompt": "Think step by step.", "question": "q", "response": "r"}
    assert openorca_map_fn(rec) == conv(
        {"system": "Think step by step.", "input": "q", "output": "r"}
    )
    rec["system_prompt"] = ""
    assert openorca_map_fn(rec) == conv({"system": "", "input": "q", "output": "r"})


def test_stack_exchange_and_default():
    assert stack_exchange_map_fn({"question": "q", "response": "r"}) == conv(
        {"input": "q", "output": "r"}
    )
    assert default_map_fn({"input": "q", "output": "r"}) == conv({"input": "q", "output": "r"})
    assert default_map_fn({"system": "s", "input": "q", "output": "r"}) == conv(
        {"system": "s", "input": "q", "output": "r"}
    )


def test_pretrain():
    assert pretrain_map_fn({"text": "  Once upon a time.\n"}) == conv(
        {"input": "", "output": "Once upon a time.", "need_eos_token": False}
    )


# ----------------------------------------------------------------------------- openai


def test_openai_multi_turn_with_loss_flags_and_weights():
    rec = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello", "loss": False},
            {"role": "user", "content": "Name a colour"},
            {"role": "assistant", "content": "Red", "loss_weight": 2.5},
            {"role": "user", "content": "Another"},
            {"role": "assistant", "content": "Blue", "loss": "False", "loss_weight": 0},
        ]
    }
    assert openai_map_fn(rec) == conv(
        {
            "system": "You are terse.",
            "input": "Hi",
            "output": "Hello",
            "output_with_loss": False,
            "loss_weight": 1.0,
        },
        {
            "system": "",
            "input": "Name a colour",
            "output": "Red",
            "output_with_loss": True,
            "loss_weight": 2.5,
        },
        {
            "system": "",
            "input": "Another",
            "output": "Blue",
            "output_with_loss": False,
            "loss_weight": 0.0,
        },
    )


def test_openai_without_weights_has_no_weight_key():
    rec = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "loss": True},
        ]
    }
    assert openai_map_fn(rec) == conv(
        {"system": "", "input": "a", "output": "b", "output_with_loss": True}
    )


def test_openai_consecutive_messages():
    rec = {
        "messages": [
            {"role": "system", "content": "S1"},
            {"role": "system", "content": "S2"},
            {"role": "user", "content": "part one"},
            {"role": "user", "content": "part two"},
            {"role": "assistant", "content": "first"},
            {"role": "assistant", "content": "second"},
            {"role": "system", "content": "S3"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "left unanswered"},
        ]
    }
    turns = openai_map_fn(rec)["conversation"]
    assert [(t["system"], t["input"], t["output"]) for t in turns] == [
        ("S1\nS2", "part one\npart two", "first"),
        ("", "", "second"),
        ("S3", "q", "a"),
    ]


def test_openai_arrow_nulls_mean_defaults():
    # datasets gives every message every key, with None where the message lacked it.
    rec = {
        "messages": [
            {"role": "user", "content": "a", "loss": None, "loss_weight": None},
            {"role": "assistant", "content": "b", "loss": None, "loss_weight": None},
        ]
    }
    assert openai_map_fn(rec) == conv(
        {"system": "", "input": "a", "output": "b", "output_with_loss": True, "loss_weight": 1.0}
    )


# ----------------------------------------------------------------------------- ShareGPT-like


def test_wizardlm_multi_turn():
    rec = {
        "idx": "7",
        "conversations": [
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ],
    }
    assert wizardlm_map_fn(rec) == conv(
        {"system": "", "input": "Q1", "output": "A1"},
        {"system": "", "input": "Q2", "output": "A2"},
    )


def test_oasst1_multi_turn_keeps_markdown_headings():
    text = (
        "### Human: Write a README heading.### Assistant: ### Usage\nRun it."
        "### Human: Thanks!### Assistant: You're welcome."
    )
    assert oasst1_map_fn({"text": text}) == conv(
        {"system": "", "input": "Write a README heading.", "output": "### Usage\nRun it."},
        {"system": "", "input": "Thanks!", "output": "You're welcome."},
    )


def test_llava_moves_image_token_to_start():
    rec = {
        "id": "0",
        "image": "coco/1.jpg",
        "conversations": [
            {"from": "human", "value": "What is in the picture?\n<image>"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": "Black."},
        ],
    }
    assert llava_map_fn(rec) == conv(
        {"system": "", "input": "<image>\nWhat is in the picture?", "output": "A cat."},
        {"system": "", "input": "What colour is it?", "output": "Black."},
    )


def test_llava_keeps_several_image_tokens_in_place():
    text = "Compare <image> with <image>."
    rec = {
        "image": ["a.png", "b.png"],
        "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "Same."}],
    }
    assert llava_map_fn(rec) == conv({"system": "", "input": text, "output": "Same."})


def test_llava_text_only_sample():
    rec = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}]}
    assert llava_map_fn(rec) == conv({"system": "", "input": "Hi", "output": "Hey"})


def test_llava_image_only():
    rec = {
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe this image briefly."},
            {"from": "gpt", "value": "a red bus on a street"},
        ]
    }
    assert llava_image_only_map_fn(rec) == conv(
        {"input": "<image>", "output": "a red bus on a street"}
    )


def test_llava_image_only_needs_image_token():
    rec = {
        "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "x"}]
    }
    with pytest.raises(ValueError, match=r"llava_image_only_map_fn.*conversations\[0\].*<image>"):
        llava_image_only_map_fn(rec)


# ----------------------------------------------------------------------------- msagent


def _fenced(obj: dict) -> str:
    return "```JSON\n" + json.dumps(obj, ensure_ascii=False) + "\n```"


def test_msagent_react():
    tool = {"name": "text-address", "description": "find the address in a text", "url": "u"}
    system = "You can use plugins listed below.\n\n1. " + json.dumps(tool) + "\n\n2. {broken"
    call = {"api_name": "text-address", "url": "u", "parameters": {"text": "杭州西湖"}}
    reply = (
        "I will look it up."
        f"<|startofthink|>{_fenced(call)}<|endofthink|>\n\n"
        f"<|startofexec|>{_fenced({'city': '杭州'})}<|endofexec|>\n"
        "The city is 杭州."
    )
    rec = {
        "conversations": [
            {"from": "system", "value": system},
            {"from": "user", "value": "Where is 西湖?"},
            {"from": "assistant", "value": reply},
            {"from": "user", "value": "Thanks"},
            {"from": "assistant", "value": "You're welcome."},
        ]
    }
    turns = msagent_react_map_fn(rec)["conversation"]
    assert [t["input"] for t in turns] == [
        "Where is 西湖?",
        'Observation: {"city": "杭州"}',
        "Thanks",
    ]
    assert [t["output"] for t in turns] == [
        'Thought: I will look it up.\nAction: text-address\nAction Input: {"text": "杭州西湖"}',
        "Final Answer: The city is 杭州.",
        "Final Answer: You're welcome.",
    ]
    assert turns[0]["system"].startswith(
        "You can call these tools:\ntext-address: find the address in a text\n\n"
    )
    assert "Action Input:" in turns[0]["system"] and "plugins" not in turns[0]["system"]
    assert turns[1]["system"] == turns[2]["system"] == ""


def test_msagent_role_content_keys_and_bad_call():
    rec = {
        "conversations": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "<|startofthink|>not json<|endofthink|>"},
        ]
    }
    with pytest.raises(ValueError, match=r"msagent_react_map_fn: conversations\[1\].*JSON"):
        msagent_react_map_fn(rec)
    rec["conversations"][1]["content"] = "plain answer"
    assert msagent_react_map_fn(rec) == conv(
        {"system": "", "input": "q", "output": "Final Answer: plain answer"}
    )


# ----------------------------------------------------------------------------- bad records


BAD_RECORDS = [
    (alpaca_map_fn, {"input": "", "output": "x"}, "'instruction'"),
    (alpaca_map_fn, {"instruction": "x", "input": "", "output": 3}, "'output'.*int"),
    (alpaca_map_fn, {"instruction": "x", "input": ["a"], "output": "y"}, "'input'.*list"),
    (alpaca_zh_map_fn, {"instruction": "x", "output": "y"}, "'output_zh'"),
    (code_alpaca_map_fn, {"prompt": "p"}, "'completion'"),
    (tiny_codes_map_fn, {"response": "r"}, "'prompt'"),
    (arxiv_map_fn, {"abstract": "a", "title": None}, "'title'"),
    (colors_map_fn, {"description": "d"}, "'color'"),
    (crime_kg_assitant_map_fn, {"output": "o"}, "'input'"),
    (law_reference_map_fn, {"question": "q"}, "'answer'"),
    (medical_map_fn, {"input": "i", "output": "o"}, "'instruction'"),
    (sql_map_fn, {"context": "c", "answer": "a"}, "'question'"),
    (openorca_map_fn, {"question": "q", "response": "r", "system_prompt": 1}, "'system_prompt'"),
    (stack_exchange_map_fn, {"question": "q"}, "'response'"),
    (default_map_fn, {"output": "o"}, "'input'"),
    (pretrain_map_fn, {"content": "x"}, "'text'"),
    (oasst1_map_fn, {"text": "no markers at all"}, "'text'"),
    (openai_map_fn, {"conversations": []}, "'messages'"),
    (openai_map_fn, {"messages": "hi"}, "'messages' must be a list"),
    (
        openai_map_fn,
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]},
        r"messages\[1\]\['content'\] must be a string",
    ),
    (openai_map_fn, {"messages": [{"role": "tool", "content": "a"}]}, r"messages\[0\]\['role'\]"),
    (
        openai_map_fn,
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "loss": "maybe"},
            ]
        },
        r"messages\[1\]\['loss'\]",
    ),
    (
        openai_map_fn,
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "loss_weight": "2"},
            ]
        },
        r"messages\[1\]\['loss_weight'\]",
    ),
    (
        openai_map_fn,
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b", "loss_weight": -1},
            ]
        },
        r"messages\[1\]\['loss_weight'\]",
    ),
    (
        wizardlm_map_fn,
        {"conversations": [{"from": "human", "value": 5}]},
        r"conversations\[0\]\['value'\]",
    ),
    (
        wizardlm_map_fn,
        {"conversations": [{"from": "bot", "value": "x"}]},
        r"conversations\[0\]\['from'\]",
    ),
    (llava_map_fn, {"image": "a.jpg"}, "'conversations'"),
    (llava_map_fn, {"conversations": ["<image>"]}, r"conversations\[0\] must be a dict"),
    (
        llava_image_only_map_fn,
        {"conversations": [{"from": "human", "value": "<image>"}]},
        "no human message with a reply",
    ),
    (msagent_react_map_fn, {"messages": []}, "'conversations'"),
    (alpaca_map_fn, "not a record", "must be a dict"),
]


@pytest.mark.parametrize("fn, rec, pattern", BAD_RECORDS)
def test_bad_records_raise_value_error_naming_fn_and_field(fn, rec, pattern):
    with pytest.raises(ValueError, match=f"^{fn.__name__}: .*{pattern}"):
        fn(rec)


# ----------------------------------------------------------------------------- with datasets


def test_datasets_map_keeps_a_consistent_schema():
    """Turn keys must agree across Arrow write batches, or datasets.map fails to cast."""
    from datasets import Dataset

    records = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "e"},
                {"role": "assistant", "content": "f", "loss": False, "loss_weight": 0.5},
            ]
        },
    ]
    dataset = Dataset.from_list(records)
    mapped = dataset.map(MAP_FUNC.get("openai_map_fn"), writer_batch_size=1)
    templated = mapped.map(template_map_fn_factory(PROMPT_TEMPLATE.qwen_chat), writer_batch_size=1)
    first, last = templated[0]["conversation"][0], templated[2]["conversation"][0]
    assert first["output"] == "b<|im_end|>"
    assert first["loss_weight"] == 1.0 and first["output_with_loss"] is True
    assert last["loss_weight"] == 0.5 and last["output_with_loss"] is False
    assert last["input"].startswith("<|im_start|>system\ns<|im_end|>\n")
    assert last["need_eos_token"] is False and last["sep"] == "\n"
