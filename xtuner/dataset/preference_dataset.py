"""Preference data: (prompt, chosen, rejected) records to token pairs for DPO, ORPO, rewards.

A record holds ``prompt`` (a list of chat messages, or a string: one user message),
``chosen`` and ``rejected`` (the preferred and the dispreferred answer: lists of assistant
messages, or strings). Each answer is rendered with the tokenizer's chat template after the
prompt; the prompt's tokens get no target. For reward models (``is_reward=True``) the
reward token is appended to each answer and only that position is labelled (0 chosen,
1 rejected).

Unpaired records (for :class:`~xtuner.model.losses.preference.KTOLoss`) hold ``prompt``,
one ``completion`` and a boolean ``label`` (desirable or not) instead of the two answers;
a data set holds one kind.

Records that cannot train are counted and skipped with one warning naming the first record
of each reason (``bad_records='raise'`` stops instead): no ``chosen`` or ``rejected``,
identical answers, a chosen or rejected sequence longer than ``max_length``, a pair longer
than ``max_packed_length`` when packing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import os.path as osp
from collections.abc import Callable
from typing import Any

import numpy as np
from datasets import Dataset as HFDataset
from datasets import concatenate_datasets
from mmengine.logging import print_log
from torch.utils.data import Dataset

from xtuner.registry import BUILDER
from xtuner.utils.constants import IGNORE_INDEX

from .huggingface import build_origin_dataset, resolve_map_fn
from .utils import is_config

__all__ = [
    "load_jsonl_dataset",
    "build_preference_dataset",
    "PreferenceDataset",
    "PackedPreferenceDataset",
    "intel_orca_dpo_map_fn",
    "orpo_dpo_mix_40k_map_fn",
]

BAD_RECORD_POLICIES = ("skip", "raise")
_SEED = 0  # the pre-pack shuffle is seeded: every rank packs the same rows


def load_jsonl_dataset(
    data_files: str | list[str] | None = None,
    data_dir: str | None = None,
    suffix: str | None = None,
) -> HFDataset:
    """Reads JSON-lines files into one HF dataset.

    Args:
        data_files: a file or a list of files; or
        data_dir: a folder whose files (ending with ``suffix``, when given) are read.
    """
    if (data_files is None) == (data_dir is None):
        raise ValueError("load_jsonl_dataset: give exactly one of data_files and data_dir")
    if data_dir is not None:
        names = sorted(os.listdir(data_dir))
        data_files = [osp.join(data_dir, n) for n in names if suffix is None or n.endswith(suffix)]
        if not data_files:
            raise FileNotFoundError(
                f"load_jsonl_dataset: no file in {data_dir} ends with {suffix!r}"
            )
    elif isinstance(data_files, str):
        data_files = [data_files]
    parts = []
    for path in data_files:
        records = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{path}:{line_no}: invalid JSON ({e.msg}); fix or remove that line"
                    ) from e
        # Every record gets every key (HF takes the columns from the first record only).
        keys = list(dict.fromkeys(k for record in records for k in record))
        parts.append(HFDataset.from_list([{k: r.get(k) for k in keys} for r in records]))
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def intel_orca_dpo_map_fn(example: dict) -> dict:
    """Intel/orca_dpo_pairs: ``system``, ``question``, ``chosen``, ``rejected`` strings."""
    prompt = [
        {"role": "system", "content": example["system"]},
        {"role": "user", "content": example["question"]},
    ]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": example["chosen"]}],
        "rejected": [{"role": "assistant", "content": example["rejected"]}],
    }


def orpo_dpo_mix_40k_map_fn(example: dict) -> dict:
    """mlabonne/orpo-dpo-mix-40k: ``chosen`` and ``rejected`` are whole conversations that
    differ in their last (assistant) message; the shared turns are the prompt."""
    chosen, rejected = example["chosen"], example["rejected"]
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(
            "orpo_dpo_mix_40k_map_fn: 'chosen' and 'rejected' must be conversations of the "
            f"same number of turns (got {len(chosen)} and {len(rejected)})"
        )
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def _messages(value: Any, role: str) -> list[dict] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [{"role": role, "content": value}] if value else None
    return list(value) or None


class _Tokenizer:
    """Turns one record into a token pair, or the reason it cannot train."""

    def __init__(self, tokenizer, max_length: int, is_reward: bool, reward_token_id: int):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "build_preference_dataset renders records with the tokenizer's chat template, "
                f"and {type(tokenizer).__name__} has none: use a chat model's tokenizer, or set "
                "one (tokenizer.chat_template = '...' and save_pretrained)"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.is_reward = is_reward
        self.reward_token_id = reward_token_id

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _answer(self, prompt: list[dict], prompt_ids: list[int], answer: list[dict], label: int):
        prompt_text = self._render(prompt, True) if prompt else ""
        full = self._render(prompt + answer, False)
        if full.startswith(prompt_text):
            # Encode the answer on its own: the prompt/answer boundary is then exact.
            ids = prompt_ids + self._encode(full[len(prompt_text) :])
        else:
            ids = self._encode(full)
        n_prompt = min(len(prompt_ids), len(ids))
        if self.is_reward:
            ids = ids + [self.reward_token_id]
            labels = [IGNORE_INDEX] * (len(ids) - 1) + [label]
        else:
            labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        return ids, labels

    def __call__(self, record: dict) -> tuple[dict | None, str | None]:
        prompt = _messages(record.get("prompt"), "user") or []
        chosen = _messages(record.get("chosen"), "assistant")
        rejected = _messages(record.get("rejected"), "assistant")
        if chosen is None and rejected is None and record.get("completion") is not None:
            return self._unpaired(record, prompt)
        if chosen is None or rejected is None:
            return None, "no 'chosen' or 'rejected' answer"
        if chosen == rejected:
            return None, "identical chosen and rejected answers"
        prompt_ids = self._encode(self._render(prompt, True)) if prompt else []
        chosen_ids, chosen_labels = self._answer(prompt, prompt_ids, chosen, 0)
        rejected_ids, rejected_labels = self._answer(prompt, prompt_ids, rejected, 1)
        if max(len(chosen_ids), len(rejected_ids)) > self.max_length:
            return None, f"a sequence longer than max_length={self.max_length}"
        untrained = [lab for lab in (chosen_labels, rejected_labels) if set(lab) == {IGNORE_INDEX}]
        if untrained and not self.is_reward:
            return None, "an answer with no token after the prompt"
        return {
            "chosen_ids": chosen_ids,
            "chosen_labels": chosen_labels,
            "rejected_ids": rejected_ids,
            "rejected_labels": rejected_labels,
        }, None

    def _unpaired(self, record: dict, prompt: list[dict]) -> tuple[dict | None, str | None]:
        """An unpaired record (KTO): one ``completion`` and a boolean ``label``."""
        label = record.get("label")
        if not isinstance(label, bool) or self.is_reward:
            return (
                None,
                "an unpaired 'completion' without a boolean 'label' (or for a reward model)",
            )
        completion = _messages(record["completion"], "assistant")
        if completion is None:
            return None, "no 'chosen' or 'rejected' answer"
        prompt_ids = self._encode(self._render(prompt, True)) if prompt else []
        ids, labels = self._answer(prompt, prompt_ids, completion, 0)
        if len(ids) > self.max_length:
            return None, f"a sequence longer than max_length={self.max_length}"
        if set(labels) == {IGNORE_INDEX}:
            return None, "an answer with no token after the prompt"
        return {"input_ids": ids, "labels": labels, "kto_label": label}, None


class _BadRecords:
    """Counts the records that cannot train, per reason, with the first index of each."""

    def __init__(self, policy: str):
        if policy not in BAD_RECORD_POLICIES:
            raise ValueError(f"bad_records={policy!r} is not one of {BAD_RECORD_POLICIES}")
        self.policy = policy
        self.counts: dict[str, list[int]] = {}

    def add(self, index: int, reason: str) -> None:
        self.counts.setdefault(reason, []).append(index)

    def report(self, total: int) -> None:
        if not self.counts:
            return
        parts = [
            f"{len(idx)} with {reason} (first: record {idx[0]})"
            for reason, idx in self.counts.items()
        ]
        message = f"preference data: {sum(map(len, self.counts.values()))} of {total} records "
        if self.policy == "raise":
            raise ValueError(
                message + "cannot train: " + "; ".join(parts) + ". Fix or remove them, or pass "
                "bad_records='skip' to build_preference_dataset to skip them"
            )
        print_log(message + "skipped: " + "; ".join(parts), "current", level=logging.WARNING)


class PreferenceDataset(Dataset):
    """Tokenised (chosen, rejected) pairs; items have ``chosen_ids``, ``chosen_labels``,
    ``rejected_ids``, ``rejected_labels`` (unpaired records: ``input_ids``, ``labels``,
    ``kto_label``).

    Args:
        dataset: records with ``prompt``, ``chosen``, ``rejected`` (see the module docstring).
        tokenizer: an HF tokenizer with a chat template.
        max_length: the longest sequence (prompt + answer) kept.
        is_dpo, is_reward: exactly one is True (XTuner 0.x's arguments).
        reward_token_id: the token appended for reward models.
        bad_records: ``'skip'`` (counted, one warning) or ``'raise'``.
    """

    def __init__(
        self,
        dataset,
        tokenizer,
        max_length: int,
        is_dpo: bool = True,
        is_reward: bool = False,
        reward_token_id: int = -1,
        bad_records: str = "skip",
    ):
        if is_dpo == is_reward:
            raise ValueError("PreferenceDataset: exactly one of is_dpo and is_reward must be True")
        if is_reward and reward_token_id < 0:
            raise ValueError(
                "PreferenceDataset: is_reward=True needs reward_token_id (the id of the token "
                "whose hidden state is scored, e.g. an unused special token)"
            )
        encode = _Tokenizer(tokenizer, max_length, is_reward, reward_token_id)
        bad = _BadRecords(bad_records)
        self.pairs: list[dict] = []
        for i, record in enumerate(dataset):
            pair, reason = encode(record)
            if pair is None:
                bad.add(i, reason)
            else:
                self.pairs.append(pair)
        bad.report(len(dataset))
        if not self.pairs:
            raise ValueError("preference data: no record is left to train on")
        kinds = {"kto_label" in pair for pair in self.pairs}
        if len(kinds) > 1:
            raise ValueError(
                "preference data mixes pairs (chosen/rejected) and unpaired records "
                "(completion/label); a data set holds one kind"
            )
        #: True for unpaired (KTO) records.
        self.unpaired = kinds == {True}
        digest = hashlib.sha1()
        for pair in self.pairs:
            for key in ("chosen_ids", "rejected_ids", "input_ids"):
                digest.update(np.asarray(pair.get(key, []), dtype=np.int64).tobytes())
        #: identifies the tokenised data (for caches of per-sequence values).
        self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        return self.pairs[index]


class PackedPreferenceDataset(Dataset):
    """Whole pairs packed into rows of at most ``max_packed_length`` tokens (varlen).

    Items have ``input_ids``, ``labels``, ``position_ids`` (restarting at each answer) and
    ``cumulative_len``; the answers alternate chosen, rejected.
    """

    def __init__(
        self,
        dataset: PreferenceDataset,
        max_packed_length: int = 16384,
        shuffle_before_pack: bool = True,
        bad_records: str = "skip",
    ):
        order = np.arange(len(dataset))
        if shuffle_before_pack:
            np.random.default_rng(_SEED).shuffle(order)
        bad = _BadRecords(bad_records)
        self.rows: list[list[dict]] = []
        self.lengths: list[int] = []
        current, size = [], 0
        for index in order.tolist():
            pair = dataset[index]
            length = len(pair["chosen_ids"]) + len(pair["rejected_ids"])
            if length > max_packed_length:
                bad.add(index, f"a pair longer than max_packed_length={max_packed_length}")
                continue
            if current and size + length > max_packed_length:
                self.rows.append(current)
                self.lengths.append(size)
                current, size = [], 0
            current.append(pair)
            size += length
        if current:
            self.rows.append(current)
            self.lengths.append(size)
        bad.report(len(dataset))
        self.fingerprint = getattr(dataset, "fingerprint", None)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        input_ids, labels, position_ids, cumulative_len = [], [], [], [0]
        for pair in self.rows[index]:
            for side in ("chosen", "rejected"):
                ids = pair[f"{side}_ids"]
                input_ids += ids
                labels += pair[f"{side}_labels"]
                position_ids += list(range(len(ids)))
                cumulative_len.append(cumulative_len[-1] + len(ids))
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "cumulative_len": cumulative_len,
        }


def build_preference_dataset(
    dataset: Any,
    tokenizer: Any,
    max_length: int,
    dataset_map_fn: Callable | str | None = None,
    is_dpo: bool = True,
    is_reward: bool = False,
    reward_token_id: int = -1,
    num_proc: int = 32,
    use_varlen_attn: bool = False,
    max_packed_length: int = 16384,
    shuffle_before_pack: bool = True,
    max_response_length: int = 4096,
    is_reference: bool = False,
    bad_records: str = "skip",
) -> Dataset:
    """Preference pairs for training, with XTuner 0.x's arguments.

    Args:
        dataset: an HF dataset or its config (e.g. ``dict(type=load_jsonl_dataset,
            data_files=...)`` or ``dict(type=load_dataset, path=...)``); the ``train`` split.
        tokenizer: the tokenizer or its config.
        max_length: the longest sequence (prompt + answer) kept.
        dataset_map_fn: turns a record into ``prompt``/``chosen``/``rejected`` (a function, a
            ``MAP_FUNC`` name or a dotted path), e.g. :func:`orpo_dpo_mix_40k_map_fn`.
        is_dpo, is_reward: policy data or reward-model data (exactly one is True).
        reward_token_id: the token appended to each answer for reward models.
        num_proc: accepted for compatibility (the map function runs on up to this many
            processes).
        use_varlen_attn: pack whole pairs into rows of ``max_packed_length`` tokens.
        max_packed_length: the packed row length.
        shuffle_before_pack: shuffle the pairs (seeded) before packing.
        max_response_length: accepted for compatibility (see ``is_reference``).
        is_reference: XTuner 0.x's POLAR reference-answer format; not supported.
        bad_records: ``'skip'`` or ``'raise'`` for records that cannot train.
    """
    if is_reference:
        raise NotImplementedError(
            "build_preference_dataset(is_reference=True) (POLAR's reference-answer format) is "
            "not supported by this fork; give records with prompt/chosen/rejected"
        )
    del max_response_length  # only used by the reference-answer format
    if is_config(tokenizer):
        tokenizer = BUILDER.build(tokenizer)
    records = build_origin_dataset(dataset, split="train")
    map_fn = resolve_map_fn(dataset_map_fn)
    if map_fn is not None:
        workers = max(1, min(num_proc or 1, os.cpu_count() or 1, len(records) // 1000 or 1))
        records = records.map(map_fn, num_proc=workers if workers > 1 else None)
    pairs = PreferenceDataset(
        records, tokenizer, max_length, is_dpo, is_reward, reward_token_id, bad_records
    )
    if use_varlen_attn:
        if pairs.unpaired:
            raise ValueError(
                "build_preference_dataset: unpaired (KTO) records are batched padded; set "
                "use_varlen_attn=False"
            )
        return PackedPreferenceDataset(pairs, max_packed_length, shuffle_before_pack, bad_records)
    return pairs
