"""Encoding (labels, BOS/EOS/SEP, images, truncation, weights) and packing, against references."""

from __future__ import annotations

import copy
import random

import numpy as np
import pyarrow as pa
import pytest

from xtuner.dataset.map_fns import template_map_fn_factory
from xtuner.dataset.utils import (
    conversation_problems,
    encode_conversations,
    encode_fn,
    fill_loss_weight,
    find_json_error,
    list_array,
    pack_table,
    prepare_record,
    ranges,
)
from xtuner.utils import PROMPT_TEMPLATE
from xtuner.utils.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def reference_encode(conversation, tokenizer, max_length=None, with_image_token=False):
    """The encoding rules written out turn by turn, one tokenizer call per text."""
    ids, labels, weights = [], [], []
    needs_bos = True
    for turn in conversation:
        start = len(ids)
        if needs_bos and tokenizer.bos_token_id is not None:
            ids.append(tokenizer.bos_token_id)
        text = turn.get("input") or ""
        chunks = text.split("<image>") if with_image_token else [text]
        for k, chunk in enumerate(chunks):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
            ids += enc(tokenizer, chunk)
        labels += [IGNORE_INDEX] * (len(ids) - len(labels))
        out = enc(tokenizer, turn["output"])
        needs_bos = turn.get("need_eos_token", True) is not False
        if needs_bos:
            out.append(tokenizer.eos_token_id)
        ids += out
        labels += (
            out if turn.get("output_with_loss", True) is not False else [IGNORE_INDEX] * len(out)
        )
        sep = enc(tokenizer, turn.get("sep") or "")
        ids += sep
        labels += [IGNORE_INDEX] * len(sep)
        weight = turn.get("loss_weight")
        weights += [1.0 if weight is None else weight] * (len(ids) - start)
    cut = slice(None, max_length)
    return ids[cut], labels[cut], weights[cut]


def formatted(template_name: str, turns: list[dict]) -> list[dict]:
    return template_map_fn_factory(PROMPT_TEMPLATE[template_name])({"conversation": turns})[
        "conversation"
    ]


def test_single_turn_default_template_labels_cover_output_and_eos(tokenizer):
    conv = formatted("default", [{"input": "Reverse the word.\nrocket", "output": "tekcor"}])
    out = encode_fn({"conversation": conv}, tokenizer, max_length=None)
    prompt = enc(tokenizer, conv[0]["input"])
    answer = enc(tokenizer, "tekcor")
    sep = enc(tokenizer, PROMPT_TEMPLATE.default.SEP)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert out["input_ids"] == [bos, *prompt, *answer, eos, *sep]
    assert out["labels"] == [IGNORE_INDEX] * (1 + len(prompt)) + answer + [eos] + [
        IGNORE_INDEX
    ] * len(sep)
    assert "loss_weight" not in out


def test_suffix_as_eos_template_trains_suffix_and_adds_no_eos_or_second_bos(tokenizer):
    turns = [
        {"system": "Be brief.", "input": "Reverse the word.\nrocket", "output": "tekcor"},
        {"input": "Count the letters.\nrocket", "output": "6"},
    ]
    conv = formatted("internlm2_chat", turns)
    assert conv[0]["need_eos_token"] is False
    out = encode_fn({"conversation": conv}, tokenizer, max_length=None)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    trained = [t for t in out["labels"] if t != IGNORE_INDEX]
    assert trained == enc(tokenizer, "tekcor<|im_end|>") + enc(tokenizer, "6<|im_end|>")
    assert trained.count(im_end) == 2
    assert tokenizer.eos_token_id not in out["input_ids"]
    assert out["input_ids"].count(tokenizer.bos_token_id) == 1 and out["input_ids"][0] == 1


def test_multi_turn_default_template_bos_after_each_eos(tokenizer):
    turns = [{"input": f"question {i}", "output": f"answer {i}"} for i in range(3)]
    conv = formatted("default", turns)
    out = encode_fn({"conversation": conv}, tokenizer, max_length=None)
    ids, labels, _ = reference_encode(conv, tokenizer)
    assert out["input_ids"] == ids and out["labels"] == labels
    assert ids.count(tokenizer.bos_token_id) == 3 and ids.count(tokenizer.eos_token_id) == 3
    trained = [t for t in labels if t != IGNORE_INDEX]
    eos = tokenizer.eos_token_id
    assert trained == sum((enc(tokenizer, f"answer {i}") + [eos] for i in range(3)), [])


def test_output_with_loss_false_masks_that_turn_and_its_eos(tokenizer):
    turns = [
        {"input": "hello", "output": "context reply", "output_with_loss": False},
        {"input": "again", "output": "learned reply"},
    ]
    conv = formatted("default", turns)
    out = encode_fn({"conversation": conv}, tokenizer, max_length=None)
    trained = [t for t in out["labels"] if t != IGNORE_INDEX]
    assert trained == enc(tokenizer, "learned reply") + [tokenizer.eos_token_id]


def test_loss_weight_is_per_token_and_aligned(tokenizer):
    turns = [
        {"input": "a", "output": "first", "loss_weight": 0.5},
        {"input": "b", "output": "second"},
        {"input": "c", "output": "third", "loss_weight": 2.0},
    ]
    conv = formatted("default", turns)
    out = encode_fn({"conversation": conv}, tokenizer, max_length=None)
    ids, labels, weights = reference_encode(conv, tokenizer)
    assert out["loss_weight"] == weights and len(weights) == len(out["labels"])
    by_weight = {}
    for label, weight in zip(out["labels"], out["loss_weight"]):
        if label != IGNORE_INDEX:
            by_weight.setdefault(weight, []).append(label)
    eos = tokenizer.eos_token_id
    assert by_weight == {
        0.5: enc(tokenizer, "first") + [eos],
        1.0: enc(tokenizer, "second") + [eos],
        2.0: enc(tokenizer, "third") + [eos],
    }


def test_image_token_and_truncation(tokenizer):
    conv = [{"input": "look <image> here", "output": "a cat", "need_eos_token": True}]
    out = encode_fn({"conversation": conv}, tokenizer, max_length=None, with_image_token=True)
    ids, labels, _ = reference_encode(conv, tokenizer, with_image_token=True)
    assert out["input_ids"] == ids and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert labels[ids.index(IMAGE_TOKEN_INDEX)] == IGNORE_INDEX
    plain = encode_fn({"conversation": conv}, tokenizer, max_length=None)
    assert IMAGE_TOKEN_INDEX not in plain["input_ids"]
    short = encode_fn({"conversation": conv}, tokenizer, max_length=5, with_image_token=True)
    assert short["input_ids"] == ids[:5] and short["labels"] == labels[:5]


def test_input_ids_without_output_encodes_prompts_only(tokenizer):
    conv = [{"input": "prompt text", "output": "answer", "sep": "\n"}]
    out = encode_fn({"conversation": conv}, tokenizer, None, input_ids_with_output=False)
    bos = tokenizer.bos_token_id
    assert out["input_ids"] == [bos, *enc(tokenizer, "prompt text"), *enc(tokenizer, "\n")]
    assert set(out["labels"]) == {IGNORE_INDEX}


def test_tokenizer_without_bos(tokenizer):
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    conv = [{"input": "x", "output": "y"}]
    out = encode_fn({"conversation": conv}, no_bos, None)
    assert out["input_ids"] == enc(tokenizer, "x") + enc(tokenizer, "y") + [no_bos.eos_token_id]


def test_batch_encoder_matches_reference_on_random_conversations(tokenizer):
    rng = random.Random(0)
    words = ["alpha", "beta", "<|im_end|>", "你好", " ", "", "<image>", "rocket\n"]
    conversations = []
    for _ in range(60):
        turns = []
        for _ in range(rng.randint(1, 4)):
            turn = {
                "input": "".join(rng.choices(words, k=rng.randint(0, 5))),
                "output": "".join(rng.choices(words, k=rng.randint(0, 5))),
                "need_eos_token": rng.random() < 0.6,
                "output_with_loss": rng.random() < 0.8,
                "sep": rng.choice(["", "\n", " SEP "]),
            }
            if rng.random() < 0.3:
                turn["loss_weight"] = rng.choice([0.0, 0.25, 3.0])
            turns.append(turn)
        conversations.append(turns)
    for max_length in (None, 7, 40):
        batch = encode_conversations(conversations, tokenizer, max_length, with_image_token=True)
        for i, conv in enumerate(conversations):
            ids, labels, weights = reference_encode(conv, tokenizer, max_length, True)
            sample = batch.sample(i)
            assert sample["input_ids"] == ids
            assert sample["labels"] == labels
            has_weight = any("loss_weight" in t for t in conv)
            assert sample["loss_weight"] == (weights if has_weight else None)


def test_conversation_problems_and_prepare_record():
    assert conversation_problems(None)[0][0] == "missing"
    assert conversation_problems([])[0][0] == "empty"
    assert conversation_problems([{"input": "a", "output": 3}])[0][0] == "non_string"
    assert conversation_problems([{"input": "a"}])[0][0] == "missing"
    assert conversation_problems([{"input": None, "output": "b"}]) == []
    problems = conversation_problems(["text", {"input": 1, "output": None}])
    assert [p[0] for p in problems] == ["missing", "missing", "non_string"]

    def map_fn(record):
        return {"conversation": [{"input": record["q"], "output": record["a"]}]}

    record, problems = prepare_record({"q": "x"}, map_fn)
    assert record is None and problems[0][0] == "missing" and "'a'" in problems[0][1]
    record, problems = prepare_record({"q": "x", "a": "y", "loss_weight": 0.5}, map_fn)
    assert problems == [] and record["conversation"][0]["loss_weight"] == 0.5
    record, problems = prepare_record(
        {"c": [{"input": "", "output": "y"}]}, None, None, [("c", "conversation")]
    )
    assert problems == [] and "conversation" in record


def lists_table(rows: list[list[int]], weights: list | None = None) -> pa.Table:
    columns = {
        "input_ids": pa.array(rows, pa.list_(pa.int32())),
        "labels": pa.array(rows, pa.list_(pa.int32())),
    }
    if weights is not None:
        columns["loss_weight"] = pa.array(weights, pa.list_(pa.float32()))
    return pa.table(columns)


@pytest.mark.parametrize("shuffle", [False, True])
def test_pack_keeps_every_token_once_and_records_boundaries(shuffle):
    rng = np.random.default_rng(0)
    docs = [list(range(1000 * i, 1000 * i + int(n))) for i, n in enumerate(rng.integers(1, 30, 57))]
    order = rng.permutation(len(docs)) if shuffle else None
    max_length = 16
    packed = pack_table(lists_table(docs), max_length, order).to_pylist()
    ordered = [docs[i] for i in (order if shuffle else range(len(docs)))]
    stream = [t for doc in ordered for t in doc]
    assert [t for row in packed for t in row["input_ids"]] == stream
    assert all(row["length"] == max_length for row in packed[:-1])
    assert 0 < packed[-1]["length"] <= max_length
    assert all(row["length"] == len(row["input_ids"]) == len(row["labels"]) for row in packed)
    # cumulative_len, shifted by each row's start, gives every document end and row end.
    ends = set(np.cumsum([len(d) for d in ordered]).tolist())
    seen = set()
    for r, row in enumerate(packed):
        cum = row["cumulative_len"]
        assert cum[0] == 0 and cum[-1] == row["length"] and cum == sorted(set(cum))
        seen |= {r * max_length + c for c in cum[1:]}
    row_ends = {r * max_length + row["length"] for r, row in enumerate(packed)}
    assert seen == ends | row_ends


def test_pack_and_fill_carry_loss_weight_aligned():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    weights = [[0.5, 0.5, 0.5], None, [2.0, 2.0, 2.0, 2.0], None]
    table = fill_loss_weight(lists_table(docs, weights))
    assert table.column("loss_weight").to_pylist() == [[0.5] * 3, [1.0] * 2, [2.0] * 4, [1.0]]
    packed = pack_table(table, 4).to_pylist()
    flat_ids = [t for row in packed for t in row["input_ids"]]
    flat_w = [w for row in packed for w in row["loss_weight"]]
    assert flat_ids == list(range(1, 11))
    assert flat_w == [0.5] * 3 + [1.0] * 2 + [2.0] * 4 + [1.0]
    assert [row["cumulative_len"] for row in packed] == [[0, 3, 4], [0, 1, 4], [0, 1, 2]]
    no_weights = fill_loss_weight(lists_table(docs, [None] * 4))
    assert "loss_weight" not in no_weights.column_names


def test_ranges_and_chunked_list_array(monkeypatch):
    assert ranges(np.array([5, 0, 9]), np.array([2, 0, 3])).tolist() == [5, 6, 9, 10, 11]
    import xtuner.dataset.utils as utils

    monkeypatch.setattr(utils, "_MAX_CHUNK_VALUES", 4)
    offsets = np.array([0, 3, 5, 9, 10, 16])
    values = np.arange(16)
    array = list_array(offsets, values, valid=np.array([True, False, True, True, True]))
    assert array.num_chunks > 1
    expected = [[0, 1, 2], None, [5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15]]
    assert array.to_pylist() == expected


def test_find_json_error_names_file_and_line(write_jsonl, tmp_path):
    path = write_jsonl([{"a": 1}, '{"a": 2', {"a": 3}])
    assert find_json_error(path).startswith(f"{path}:2: invalid JSON")
    good = write_jsonl([{"a": 1}], name="good.jsonl")
    assert find_json_error([good]) is None
    array = tmp_path / "list.json"
    array.write_text('[\n {"a": 1},\n {"a": }\n]\n')
    assert find_json_error({"train": str(array)}).startswith(f"{array}:3:")
