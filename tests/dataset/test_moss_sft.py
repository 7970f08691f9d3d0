"""MOSSSFTDataset: ids and labels against a piece-by-piece reference, plugin turns, bad lines."""

from __future__ import annotations

import pytest

from xtuner.dataset import MOSSSFTDataset

META = "You are an AI assistant whose name is MOSS.\n"
PLAIN = {
    "meta_instruction": META,
    "num_turns": 1,
    "chat": {
        "turn_1": {"Human": "<|Human|>: Hi<eoh>\n", "MOSS": "<|MOSS|>: Hello, MOSS here<eom>\n"}
    },
}
PLUGIN_TURN = {
    "Human": "<|Human|>: What is 2+3?<eoh>\n",
    "Inner Thoughts": "<|Inner Thoughts|>: use the calculator<eot>\n",
    "Commands": '<|Commands|>: Calculate("2+3")<eoc>\n',
    "Tool Responses": '<|Results|>:\nCalculate("2+3") => 5<eor>\n',
    "MOSS": "<|MOSS|>: It is 5.<eom>\n",
}
PLUGIN = {
    "meta_instruction": META,
    "num_turns": 2,
    "chat": {
        "turn_1": PLUGIN_TURN,
        "turn_2": {"Human": "<|Human|>: thanks<eoh>\n", "MOSS": "<|MOSS|>: you are welcome<eom>\n"},
    },
}
MISSING_TURN = {
    "meta_instruction": META,
    "num_turns": 2,
    "chat": {"turn_1": PLAIN["chat"]["turn_1"]},
}
LONG = {
    "meta_instruction": META,
    "num_turns": 2,
    "chat": {
        "turn_1": PLAIN["chat"]["turn_1"],
        "turn_2": {"Human": "<|Human|>: " + "tell me more " * 100 + "<eoh>\n", "MOSS": "ok<eom>\n"},
    },
}


def reference(tokenizer, record: dict, bot_name: str | None, max_length: int):
    """MOSS's layout, built piece by piece with ``tokenizer.encode``."""

    def rename(text: str) -> str:
        return text if bot_name is None else text.replace("MOSS", bot_name)

    def enc(text: str) -> list[int]:
        return tokenizer.encode(rename(text), add_special_tokens=False)

    meta = tokenizer.encode(rename(record["meta_instruction"]))
    ids, labels = list(meta), [-100] * len(meta)
    for i in range(1, record["num_turns"] + 1):
        turn_ids, turn_labels = [], []
        for key, value in record["chat"][f"turn_{i}"].items():
            piece = enc(value)
            piece_labels = list(piece)
            if key == "Tool Responses":
                # The plugin's output is context; the '<|Results|>:' and '<eor>\n' marks are not.
                n_pre, n_post = len(enc("<|Results|>:")), len(enc("<eor>\n"))
                piece_labels[n_pre : len(piece) - n_post] = [-100] * (len(piece) - n_pre - n_post)
            turn_ids += piece
            turn_labels += piece_labels
        if len(ids) + len(turn_ids) > max_length:
            break
        ids += turn_ids
        labels += turn_labels
    return ids, labels


@pytest.fixture(scope="module")
def bos_tokenizer(demo_assets):
    """The demo tokenizer made Llama-like: ``encode`` starts every text with BOS."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    tok._tokenizer.post_processor = TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)]
    )
    assert tok.encode("hi")[0] == tok.bos_token_id != tok.encode("hi", add_special_tokens=False)[0]
    return tok


@pytest.mark.parametrize("family", ["no_bos", "bos"])
def test_samples_equal_the_reference_and_bad_lines_are_counted(
    family, request, write_jsonl, mm_warnings
):
    tokenizer = request.getfixturevalue("tokenizer" if family == "no_bos" else "bos_tokenizer")
    path = write_jsonl([PLAIN, "{not json", PLUGIN, MISSING_TURN, LONG])
    ds = MOSSSFTDataset(path, tokenizer, max_length=256, bot_name="Bot")
    assert len(ds) == 3
    for sample, record in zip(ds, [PLAIN, PLUGIN, LONG]):
        ids, labels = reference(tokenizer, record, "Bot", 256)
        assert sample["input_ids"] == ids
        assert sample["labels"] == labels
    # The name is replaced in the meta instruction and the replies (not in the keys).
    assert "MOSS" not in tokenizer.decode(ds[0]["input_ids"])
    assert "Bot" in tokenizer.decode(ds[0]["input_ids"])
    # The plugin's result is masked, its marks and the rest of the turn are trained on.
    text = tokenizer.decode([t for t in ds[1]["labels"] if t != -100])
    assert "=> 5" not in text and "<|Results|>:" in text and "<eor>" in text
    assert "It is 5." in text and "you are welcome" in text
    # The long record keeps its first turn only.
    assert len(ds[2]["input_ids"]) == len(reference(tokenizer, PLAIN, "Bot", 256)[0])

    assert [line for line, _ in ds.skipped] == [2, 4]
    assert "invalid JSON" in ds.skipped[0][1]
    assert "'chat.turn_2' is missing" in ds.skipped[1][1]
    assert len(mm_warnings) == 1
    assert "skipped 2 of 5 records" in mm_warnings[0] and "line 4" in mm_warnings[0]


def test_without_bot_name_and_a_file_with_no_usable_record(tokenizer, write_jsonl):
    ds = MOSSSFTDataset(write_jsonl([PLAIN]), tokenizer, max_length=2048)
    assert ds[0]["input_ids"] == reference(tokenizer, PLAIN, None, 2048)[0]
    with pytest.raises(ValueError, match=r"no usable record in .*bad.jsonl.*line 1: 'chat'"):
        MOSSSFTDataset(write_jsonl([{"meta_instruction": META}], "bad.jsonl"), tokenizer)
