"""Intern-repo data: the ftdp tokeniser against a hand-built reference, its output loaded back,
the file order, untokenized folders, and packing against a naive packer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from datasets import DatasetDict
from transformers import AutoTokenizer

from xtuner.dataset.collate_fns import default_collate_fn
from xtuner.dataset.intern_repo import (
    build_packed_dataset,
    load_intern_repo_tokenized_dataset,
    load_intern_repo_untokenized_dataset,
)
from xtuner.dataset.map_fns import template_map_fn_factory
from xtuner.dataset.samplers import InternRepoSampler
from xtuner.entry_point import cli
from xtuner.tools.tokenize_ftdp_datasets import add_special_tokens, encode_ftdp_messages
from xtuner.utils import PROMPT_TEMPLATE

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
]
TOOLS = [
    {"role": "user", "content": "Add two and three."},
    {"role": "thought", "content": "Use the interpreter."},
    {"role": "tool", "name": "interpreter", "content": "print(2 + 3)"},
    {"role": "environment", "name": "interpreter", "content": "5"},
    {"role": "assistant", "content": "It is 5."},
]
NO_LOSS = [
    {"role": "user", "content": "Say hi."},
    {"role": "assistant", "content": "Hi.", "loss": False},
    {"role": "user", "content": "Again."},
    {"role": "assistant", "content": "Hi again."},
]


@pytest.fixture(scope="module")
def ftdp_tokenizer(demo_assets):
    tokenizer = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    add_special_tokens(tokenizer)
    return tokenizer


def test_ftdp_encoding_equals_the_chatml_layout_built_by_hand(ftdp_tokenizer):
    tok = ftdp_tokenizer

    def ctx(text):  # context: no loss (negative ids)
        return [-t for t in tok.encode(text, add_special_tokens=False)]

    def train(text):
        return tok.encode(text, add_special_tokens=False)

    end = "<|im_end|>\n"
    assert encode_ftdp_messages(CHAT, tok) == [tok.bos_token_id] + (
        ctx("<|im_start|>system\n") + ctx("Be brief.") + ctx(end)
        + ctx("<|im_start|>user\n") + ctx("Name a colour.") + ctx(end)
        + ctx("<|im_start|>assistant\n") + train("Red.") + train(end)
    )  # fmt: skip
    # thought and tool fold into one assistant message; the environment's name is a token.
    assert encode_ftdp_messages(TOOLS, tok) == [tok.bos_token_id] + (
        ctx("<|im_start|>user\n") + ctx("Add two and three.") + ctx(end)
        + ctx("<|im_start|>assistant\n")
        + train("Use the interpreter.<|action_start|><|interpreter|>\nprint(2 + 3)<|action_end|>\n")
        + train(end)
        + ctx("<|im_start|>environment name=<|interpreter|>\n") + ctx("5") + ctx(end)
        + ctx("<|im_start|>assistant\n") + train("It is 5.") + train(end)
    )  # fmt: skip
    # "loss": false makes a reply context; its closer stays trained as upstream does.
    assert encode_ftdp_messages(NO_LOSS, tok) == [tok.bos_token_id] + (
        ctx("<|im_start|>user\n") + ctx("Say hi.") + ctx(end)
        + ctx("<|im_start|>assistant\n") + ctx("Hi.") + train(end)
        + ctx("<|im_start|>user\n") + ctx("Again.") + ctx(end)
        + ctx("<|im_start|>assistant\n") + train("Hi again.") + train(end)
    )  # fmt: skip
    assert len(encode_ftdp_messages(CHAT, tok, max_len=5)) == 5
    with pytest.raises(ValueError, match="message 1 has role 'robot'"):
        encode_ftdp_messages([CHAT[0], {"role": "robot", "content": "x"}], tok)


def _write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)


def test_tokenized_ftdp_loads_back_sample_for_sample(tmp_path, demo_assets, ftdp_tokenizer, capsys):
    processed, out, saved = tmp_path / "ftdp", tmp_path / "tokenized", tmp_path / "tok"
    _write_lines(processed / "chat" / "processed" / "sft" / "a.jsonl", [CHAT, NO_LOSS])
    _write_lines(processed / "tools" / "processed" / "b.jsonl", [TOOLS])
    _write_lines(processed / "tools" / "origin" / "c.jsonl", ["not read"])  # not 'processed'
    args = ["--processed-dir", str(processed), "--tokenized-dir", str(out)]
    args += ["--tokenizer-path", demo_assets["tokenizer"]]
    # The demo tokenizer lacks the special tokens: refused without a folder to save it to.
    assert cli(["tokenize_ftdp_datasets", *args]) == 1
    assert "--tokenizer-w-special-tokens-save-dir" in capsys.readouterr().err
    assert (
        cli(["tokenize_ftdp_datasets", *args, "--tokenizer-w-special-tokens-save-dir", str(saved)])
        == 0
    )
    assert "<|action_start|>" in AutoTokenizer.from_pretrained(str(saved)).get_vocab()

    train = out / "chatml_llamav13_32k" / "train"
    assert sorted(str(p.relative_to(train)) for p in train.rglob("*.bin*")) == [
        "cn/chat/a.bin", "cn/chat/a.bin.meta", "cn/tools/b.bin", "cn/tools/b.bin.meta",
    ]  # fmt: skip
    parts = load_intern_repo_tokenized_dataset(str(train))
    loaded = [row for part in parts for row in part]
    for row, messages in zip(loaded, [CHAT, NO_LOSS, TOOLS], strict=True):
        signed = encode_ftdp_messages(messages, ftdp_tokenizer)
        assert row["input_ids"] == [abs(t) for t in signed]
        assert row["labels"] == [t if t > 0 else -100 for t in signed]
        assert row["length"] == len(signed)
    meta = np.load(train / "cn" / "chat" / "a.bin.meta")
    assert meta[:, 1].tolist() == [loaded[0]["length"], loaded[1]["length"]]
    assert meta[1, 0] == len((train / "cn" / "chat" / "a.bin").read_bytes().splitlines()[0]) + 1

    # The file order: written by get_data_order, then edited to read the tools first.
    order = tmp_path / "order"
    assert cli(["get_data_order", "--data-folder", str(train), "--save-folder", str(order)]) == 0
    names = (order / "data_order.txt").read_text().splitlines()
    assert names == ["cn/chat/a.bin", "cn/tools/b.bin"]
    (order / "data_order.txt").write_text("cn/tools/b.bin\ncn/chat/a.bin\n")
    reordered = load_intern_repo_tokenized_dataset(
        str(train), data_order_path=str(order / "data_order.txt")
    )
    assert [len(p) for p in reordered] == [1, 2]
    assert (
        load_intern_repo_tokenized_dataset(str(train), min_length=loaded[2]["length"])[0][0]
        == loaded[2]
    )
    (order / "data_order.txt").write_text("cn/chat/a.bin\ncn/gone.bin\n")
    with pytest.raises(FileNotFoundError, match=r"data_order.txt:2: cn/gone.bin"):
        load_intern_repo_tokenized_dataset(
            str(train), data_order_path=str(order / "data_order.txt")
        )

    # A bad line stops the tokeniser with its file and line.
    _write_lines(processed / "bad" / "processed" / "x.jsonl", [CHAT, [{"role": "user"}]])
    assert (
        cli(["tokenize_ftdp_datasets", *args, "--tokenizer-w-special-tokens-save-dir", str(saved)])
        == 1
    )
    assert (
        "x.jsonl:2: message 0 must be an object with a string 'content'" in capsys.readouterr().err
    )


def test_tokenized_files_bad_lines_and_stale_meta(tmp_path):
    _write_lines(tmp_path / "d" / "a.bin", [{"tokens": [1, -5, -6, 7, 0]}])
    (row,) = load_intern_repo_tokenized_dataset(str(tmp_path / "d"))[0]
    assert row["input_ids"] == [1, 5, 6, 7, 0] and row["labels"] == [1, -100, -100, 7, -100]
    with open(tmp_path / "d" / "a.bin.meta", "wb") as f:
        np.save(f, np.array([[0, 4]]))
    with pytest.raises(ValueError, match="a.bin.meta does not match"):
        load_intern_repo_tokenized_dataset(str(tmp_path / "d"))
    _write_lines(tmp_path / "e" / "a.bin", [{"tokens": [1]}, {"ids": [2]}])
    with pytest.raises(ValueError, match=r"a.bin:2: a tokenized line must be"):
        load_intern_repo_tokenized_dataset(str(tmp_path / "e"))


def naive_pack(samples: list[dict], length: int, seed: int) -> list[dict]:
    """InternEvo's packing written plainly: shuffle, concatenate, cut; the tail is a row too."""
    order = np.arange(len(samples))
    np.random.RandomState(seed).shuffle(order)
    ids, labels, ends = [], [], []
    for i in order:
        ids += samples[i]["input_ids"]
        labels += samples[i]["labels"]
        ends.append(len(ids))
    rows = []
    for lo in range(0, len(ids), length):
        hi = min(lo + length, len(ids))
        cuts = sorted({e - lo for e in ends if lo < e <= hi} | {hi - lo})
        rows.append(
            {"input_ids": ids[lo:hi], "labels": labels[lo:hi], "cumulative_len": [0, *cuts]}
        )
    return rows


def test_untokenized_folder_reference_bad_record_saved_copy_and_packing(
    tmp_path, tokenizer, mm_warnings
):
    folder = tmp_path / "raw"
    good = [
        [
            {"role": "user", "content": f"Count to {n}."},
            {"role": "assistant", "content": " ".join(map(str, range(n)))},
        ]
        for n in range(1, 7)
    ]
    bad = [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "beep"}]
    _write_lines(folder / "b" / "one.json", good[:4] + [bad])
    _write_lines(folder / "a.json", good[4:])
    template = dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.internlm2_chat)
    cfg = dict(
        type=load_intern_repo_untokenized_dataset,
        folder=str(folder),
        tokenizer=tokenizer,
        max_length=256,
        template_map_fn=template,
    )
    parts = load_intern_repo_untokenized_dataset(**{k: v for k, v in cfg.items() if k != "type"})
    # Sorted paths: a.json before b/one.json; the robot's record is counted and skipped.
    assert [len(p) for p in parts] == [2, 4]
    assert len(mm_warnings) == 1 and "1 failed in the map function" in mm_warnings[0]

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    samples = [row for part in parts for row in part]
    for row, messages in zip(samples, good[4:] + good[:4], strict=True):
        prompt = enc(
            f"<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"
        )
        reply = enc(messages[1]["content"] + "<|im_end|>")
        bos = [tokenizer.bos_token_id]
        assert row["input_ids"] == bos + prompt + reply + enc("\n")
        assert row["labels"] == [-100] * (1 + len(prompt)) + reply + [-100] * len(enc("\n"))

    # Saved once (a DatasetDict keyed by file number), it loads back sample for sample.
    DatasetDict({str(i): p for i, p in enumerate(parts)}).save_to_disk(str(tmp_path / "saved"))
    again = load_intern_repo_untokenized_dataset(
        processed_dataset_dict_path=str(tmp_path / "saved")
    )
    assert [row for part in again for row in part] == samples

    packed = build_packed_dataset(cfg, packed_length=40, seed=1024)
    expected = naive_pack(samples[:2], 40, 1024) + naive_pack(samples[2:], 40, 1024)
    rows = [packed[i] for i in range(len(packed))]
    assert len(rows) == len(expected)
    for row, ref in zip(rows, expected):
        assert {k: row[k] for k in ref} == ref
        assert row["length"] == len(ref["input_ids"])
    assert packed.datasets[0].length == [
        len(r["input_ids"]) for r in expected[: len(packed.datasets[0])]
    ]

    # The sampler deals the rows; the collate restarts positions at each packed document.
    order = list(InternRepoSampler(packed, seed=1024))
    assert sorted(order) == list(range(len(packed)))
    batch = default_collate_fn([rows[0]], use_varlen_attn=True)["data"]
    bounds = rows[0]["cumulative_len"]
    positions = [p for lo, hi in zip(bounds, bounds[1:]) for p in range(hi - lo)]
    assert batch["position_ids"][0, : len(positions)].tolist() == positions
