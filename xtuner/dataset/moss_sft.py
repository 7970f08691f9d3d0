"""``MOSSSFTDataset``: the MOSS-003 SFT data (``fnlp/moss-003-sft-data``), with its plugin turns.

Each line of the JSON Lines file is one conversation::

    {"meta_instruction": "You are an AI assistant whose name is MOSS. ...",
     "num_turns": 2,
     "chat": {"turn_1": {"Human": "<|Human|>: ...<eoh>\\n",
                         "Inner Thoughts": "<|Inner Thoughts|>: ...<eot>\\n",
                         "Commands": "<|Commands|>: ...<eoc>\\n",
                         "Tool Responses": "<|Results|>:\\n...<eor>\\n",
                         "MOSS": "<|MOSS|>: ...<eom>\\n"},
              "turn_2": {...}}}

The text is already formatted, so no prompt template is applied. A sample is encoded the way
XTuner 0.x (and MOSS's own fine-tuning script) encode it:

- the meta instruction, tokenised with the tokenizer's special tokens (BOS where it adds
  one), labelled ``-100``;
- then every value of each turn, in the order the record lists them, tokenised without special
  tokens and concatenated; all of them are trained on (the human turn too, as upstream does),
  except the body of ``Tool Responses``: the tokens between its ``<|Results|>:`` prefix and
  its ``<eor>\\n`` suffix are labelled ``-100`` (the plugin wrote them, not the model), while
  the prefix and suffix themselves are trained on;
- whole turns are kept while the sample fits in ``max_length``; a record whose first turn
  already does not fit is skipped.

``bot_name`` replaces the word ``MOSS`` in the meta instruction and in every value (not in the
keys), so the model learns its own name.

Bad records (a line that is not JSON, a missing ``chat``/``turn_i``/``meta_instruction``, a
value that is not a string or encodes to nothing) are skipped, counted, and named in one
warning (upstream skipped them silently): the MOSS dump has a million lines and one broken
line should not stop a run. A file with no usable record raises a ``ValueError``.

Unlike upstream, nothing is cached next to the data file: the texts are tokenised in batches,
which is fast enough to redo at each start.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from mmengine.logging import print_log
from torch.utils.data import Dataset

from xtuner.registry import BUILDER
from xtuner.utils.constants import IGNORE_INDEX

from .utils import _tokenize, is_config, read_json_records

#: the key of a turn whose body comes from a plugin; its prefix and suffix are trained on.
TOOL_KEY = "Tool Responses"
TOOL_PREFIX = "<|Results|>:"
TOOL_SUFFIX = "<eor>\n"
#: how many bad lines the warning names.
_SHOWN = 5


def _check_record(record: Any) -> tuple[str, list[dict[str, str]]]:
    """The meta instruction and turns of one record; ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    meta = record.get("meta_instruction")
    if not isinstance(meta, str):
        raise ValueError("'meta_instruction' is missing or not a string")
    chat = record.get("chat")
    if not isinstance(chat, dict):
        raise ValueError("'chat' is missing or not an object")
    try:
        num_turns = int(record.get("num_turns", len(chat)))
    except (TypeError, ValueError):
        raise ValueError(f"'num_turns' is {record.get('num_turns')!r}, not a number") from None
    turns = []
    for i in range(1, num_turns + 1):
        turn = chat.get(f"turn_{i}")
        if not isinstance(turn, dict) or not turn:
            raise ValueError(f"'chat.turn_{i}' is missing or empty ('num_turns' is {num_turns})")
        for key, value in turn.items():
            if not isinstance(value, str):
                raise ValueError(f"'chat.turn_{i}.{key}' is {type(value).__name__}, not a string")
        turns.append(turn)
    if not turns:
        raise ValueError("the conversation has no turns")
    return meta, turns


class MOSSSFTDataset(Dataset):
    """MOSS-003 SFT conversations, tokenised once (see the module docstring for the layout).

    Args:
        data_file: a MOSS JSON Lines file.
        tokenizer: a Hugging Face tokenizer or its config.
        max_length: most tokens per sample; turns that would pass it are dropped.
        bot_name: replaces ``MOSS`` in the texts (None: keep it).

    Each sample is ``{'input_ids': [...], 'labels': [...]}``. ``skipped`` lists the
    ``(line, reason)`` of every record left out.
    """

    def __init__(
        self,
        data_file: str,
        tokenizer: Any,
        max_length: int = 2048,
        bot_name: str | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = BUILDER.build(tokenizer) if is_config(tokenizer) else tokenizer
        self.src_data_file = data_file
        self.max_length = max_length
        self.bot_name = bot_name
        self.skipped: list[tuple[int | None, str]] = []
        self.data: list[list[int]] = []
        self.labels: list[list[int]] = []
        self._load()

    def _rename(self, text: str) -> str:
        return text if self.bot_name is None else text.replace("MOSS", self.bot_name)

    def _load(self) -> None:
        records = []
        for line, record, error in read_json_records(self.src_data_file):
            try:
                if error is not None:
                    raise ValueError(error)
                records.append((line, *_check_record(record)))
            except ValueError as e:
                self.skipped.append((line, str(e)))
        tokenizer = self.tokenizer
        metas = sorted({self._rename(meta) for _, meta, _ in records})
        meta_ids = (
            dict(zip(metas, tokenizer(metas, add_special_tokens=True)["input_ids"]))
            if metas
            else {}
        )
        texts = sorted(
            {self._rename(v) for *_, turns in records for turn in turns for v in turn.values()}
        )
        text_ids = dict(zip(texts, _tokenize(tokenizer, texts))) if texts else {}
        pre = len(_tokenize(tokenizer, [TOOL_PREFIX])[0])
        post = len(_tokenize(tokenizer, [TOOL_SUFFIX])[0])
        for line, meta, turns in records:
            sample = self._encode(meta_ids[self._rename(meta)], turns, text_ids, pre, post)
            if isinstance(sample, str):
                self.skipped.append((line, sample))
                continue
            self.data.append(sample[0])
            self.labels.append(sample[1])
        self.skipped.sort(key=lambda x: x[0] or 0)
        self._warn()

    def _encode(
        self, meta: list[int], turns: list[dict], text_ids: dict, pre: int, post: int
    ) -> tuple[list[int], list[int]] | str:
        """``(input_ids, labels)`` of one record, or the reason it is skipped."""
        if not meta:
            return "'meta_instruction' encodes to no token"
        ids = np.asarray(meta, dtype=np.int64)
        masked = [(0, len(meta))]
        for i, turn in enumerate(turns, start=1):
            pieces, turn_masked, start = [], [], len(ids)
            for key, value in turn.items():
                piece = text_ids[self._rename(value)]
                if not piece:
                    return f"'chat.turn_{i}.{key}' encodes to no token"
                if key == TOOL_KEY:
                    turn_masked.append((start + pre, start + len(piece) - post))
                pieces.append(piece)
                start += len(piece)
            if start > self.max_length:
                break
            ids = np.concatenate([ids, *[np.asarray(p, dtype=np.int64) for p in pieces]])
            masked += turn_masked
        if len(ids) == len(meta):
            return f"the first turn does not fit in max_length={self.max_length}"
        labels = ids.copy()
        for lo, hi in masked:
            labels[lo:hi] = IGNORE_INDEX
        return ids.tolist(), labels.tolist()

    def _warn(self) -> None:
        source = self.src_data_file
        if not self.data:
            shown = "; ".join(f"line {n}: {why}" for n, why in self.skipped[:_SHOWN])
            raise ValueError(
                f"MOSSSFTDataset: no usable record in {source} ({shown or 'the file is empty'}); "
                "each line must be a MOSS record with 'meta_instruction', 'num_turns' and "
                "'chat' (see docs/en/moss.md)"
            )
        if self.skipped:
            shown = "; ".join(f"line {n}: {why}" for n, why in self.skipped[:_SHOWN])
            more = ", ..." if len(self.skipped) > _SHOWN else ""
            print_log(
                f"MOSSSFTDataset {source}: skipped {len(self.skipped)} of "
                f"{len(self.skipped) + len(self.data)} records ({shown}{more})",
                logger="current",
                level=logging.WARNING,
            )
        print_log(f"MOSSSFTDataset {source}: {len(self.data)} samples", logger="current")

    @property
    def length(self) -> list[int]:
        """Tokens of each sample (for ``LengthGroupedSampler``)."""
        return [len(x) for x in self.data]

    @property
    def modality_length(self) -> list[int]:
        return self.length

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.data[index], "labels": self.labels[index]}
