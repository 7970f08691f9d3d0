"""Preference data: records to token pairs, bad records, packing, map functions, collation."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn
from xtuner.dataset.preference_dataset import (
    build_preference_dataset,
    intel_orca_dpo_map_fn,
    load_jsonl_dataset,
    orpo_dpo_mix_40k_map_fn,
)

# One file keeps one type per field (an Arrow column); strings and message lists both work.
GOOD = [
    {"prompt": "Name a color.", "chosen": "Red.", "rejected": "Seven."},
    {"prompt": "Count to two.", "chosen": "one two", "rejected": "two"},
]
MESSAGES = [
    {
        "prompt": [{"role": "user", "content": "Name a color."}],
        "chosen": [{"role": "assistant", "content": "Red."}],
        "rejected": [{"role": "assistant", "content": "Seven."}],
    }
]
BAD = [
    {"prompt": "No answers."},
    {"prompt": "Same.", "chosen": "yes", "rejected": "yes"},
    {"prompt": "Long.", "chosen": "word " * 200, "rejected": "short"},
]


@pytest.fixture
def tok(chat_model_path):
    return AutoTokenizer.from_pretrained(chat_model_path)


def test_pairs_label_only_the_answers_rendered_with_the_chat_template(tok, write_jsonl):
    path = write_jsonl(GOOD)
    ds = build_preference_dataset(
        dict(type=load_jsonl_dataset, data_files=path), tok, max_length=64
    )
    assert len(ds) == 2
    pair = ds[0]
    messages = build_preference_dataset(MESSAGES, tok, max_length=64)
    assert messages[0] == pair  # a string is one user (prompt) or assistant (answer) message
    prompt = tok.apply_chat_template(
        MESSAGES[0]["prompt"], tokenize=False, add_generation_prompt=True
    )
    n_prompt = len(tok.encode(prompt, add_special_tokens=False))
    for side, answer in (("chosen", "Red."), ("rejected", "Seven.")):
        ids, labels = pair[f"{side}_ids"], pair[f"{side}_labels"]
        assert labels[:n_prompt] == [-100] * n_prompt
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tok.decode(ids[n_prompt:]) == answer + "<|im_end|>\n"


def test_bad_records_are_counted_and_named_or_refused(tok, write_jsonl, capsys):
    path = write_jsonl(BAD + GOOD)
    cfg = dict(type=load_jsonl_dataset, data_files=path)
    ds = build_preference_dataset(cfg, tok, max_length=64)
    assert len(ds) == 2
    with pytest.raises(ValueError) as err:
        build_preference_dataset(cfg, tok, max_length=64, bad_records="raise")
    message = str(err.value)
    for reason in (
        "no 'chosen' or 'rejected'",
        "record 0",
        "identical chosen and rejected",
        "record 1",
        "longer than max_length=64",
        "record 2",
    ):
        assert reason in message
    assert "3 of 5 records" in message


def test_packed_pairs_and_reward_labels(tok, write_jsonl):
    path = write_jsonl(GOOD * 3)
    ds = build_preference_dataset(
        dict(type=load_jsonl_dataset, data_files=path),
        tok,
        max_length=64,
        is_dpo=False,
        is_reward=True,
        reward_token_id=0,
        use_varlen_attn=True,
        max_packed_length=80,
    )
    rows = [ds[i] for i in range(len(ds))]
    assert sum(len(r["cumulative_len"]) - 1 for r in rows) == 12  # every answer, whole pairs
    for row in rows:
        ends = row["cumulative_len"][1:]
        assert [row["input_ids"][e - 1] for e in ends] == [0] * len(ends)  # reward token last
        assert [row["labels"][e - 1] for e in ends] == [0, 1] * (len(ends) // 2)
        assert sum(lab != -100 for lab in row["labels"]) == len(ends)
    batch = preference_collate_fn(rows[:2], use_varlen_attn=True)["data"]
    # Padding continues the last answer: the number of sequences is the number of answers.
    starts = (batch["position_ids"] == 0).sum().item()
    assert starts == sum(len(r["cumulative_len"]) - 1 for r in rows[:2])
    with pytest.raises(ValueError, match="reward_token_id"):
        build_preference_dataset(
            dict(type=load_jsonl_dataset, data_files=path), tok, 64, is_dpo=False, is_reward=True
        )


def test_padded_batches_alternate_chosen_and_rejected(tok, write_jsonl):
    ds = build_preference_dataset(
        dict(type=load_jsonl_dataset, data_files=write_jsonl(GOOD)), tok, 64
    )
    data = preference_collate_fn([ds[0], ds[1]])["data"]
    assert data["input_ids"].shape[0] == 4
    for row, (i, side) in enumerate(
        [(0, "chosen"), (0, "rejected"), (1, "chosen"), (1, "rejected")]
    ):
        n = len(ds[i][f"{side}_ids"])
        assert data["input_ids"][row, :n].tolist() == ds[i][f"{side}_ids"]
        assert (data["position_ids"][row] == torch.arange(data["input_ids"].shape[1])).all()
    with pytest.raises(ValueError, match="use_varlen_attn=True"):
        preference_collate_fn([{"input_ids": [1], "labels": [1], "cumulative_len": [0, 1]}])


def test_map_functions_and_missing_chat_template(tiny_llama_path):
    mix = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
    }
    assert orpo_dpo_mix_40k_map_fn(mix) == {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    orca = intel_orca_dpo_map_fn({"system": "s", "question": "q", "chosen": "c", "rejected": "r"})
    assert orca["prompt"][0] == {"role": "system", "content": "s"}
    assert orca["chosen"] == [{"role": "assistant", "content": "c"}]
    plain = AutoTokenizer.from_pretrained(tiny_llama_path)
    with pytest.raises(ValueError, match="chat template"):
        build_preference_dataset([GOOD[0]], plain, 64)
