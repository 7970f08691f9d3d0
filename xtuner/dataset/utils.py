"""Record checks, tokenisation of conversations (``encode_fn``) and packing.

A conversation is a list of turns ``{'input', 'output', 'system'?, 'output_with_loss'?,
'loss_weight'?, 'need_eos_token'?, 'sep'?}`` whose ``input``/``output`` are already formatted by
the template. Encoding one sample gives (labels are not shifted):

    [BOS] input_1 output_1 [EOS] sep_1 [BOS] input_2 output_2 [EOS] sep_2 ...

- BOS starts the sample and every turn that follows an EOS (XTuner 0.x layout); tokenizers
  without a BOS token (Qwen) get none.
- ``input`` and ``sep`` tokens are labelled ``IGNORE_INDEX``; ``output`` tokens and their EOS
  are labelled with their ids unless the turn has ``output_with_loss=False``.
- EOS follows an output unless the turn says ``need_eos_token=False`` (templates whose suffix
  ends the turn).
- ``<image>`` in an input becomes ``IMAGE_TOKEN_INDEX`` when ``with_image_token``.
- The sample is truncated to ``max_length`` tokens.
- A turn's ``loss_weight`` (default 1.0) is given to every token of that turn.

Packing concatenates samples and cuts the stream into rows of ``max_length`` tokens; every
token is kept exactly once, so a sample can continue into the next row and the last row may be
shorter. ``cumulative_len`` records where each piece starts inside its row.
"""

from __future__ import annotations

import itertools
import json
import os.path as osp
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from xtuner.utils.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX

__all__ = [
    "DROP_REASONS",
    "EncodedBatch",
    "TURN_DEFAULTS",
    "conversation_problems",
    "encode_conversations",
    "encode_fn",
    "fill_loss_weight",
    "list_array",
    "list_column",
    "find_json_error",
    "get_bos_eos_token_ids",
    "is_config",
    "json_files",
    "pack_table",
    "prepare_record",
    "ranges",
    "read_json_records",
]

# Why a record is dropped: code -> phrase for the counted warning ("2 with no trainable tokens").
DROP_REASONS = {
    "map_error": "failed in the map function",
    "missing": "missing fields",
    "empty": "empty",
    "non_string": "with non-string messages",
    "no_trainable": "with no trainable tokens",
}

# Every key the encoder reads from a turn, with the value used when it is absent or None.
TURN_DEFAULTS: dict[str, Any] = {
    "system": "",
    "input": "",
    "output": "",
    "output_with_loss": True,
    "need_eos_token": True,
    "sep": "",
    "loss_weight": 1.0,
}

Problem = tuple[str, str]  # (code in DROP_REASONS, human-readable detail)


def is_config(obj: Any) -> bool:
    """Whether ``obj`` is a config to build (a dict, but not a built ``DatasetDict``)."""
    from datasets import DatasetDict
    from mmengine.config import Config, ConfigDict

    return isinstance(obj, (dict, Config, ConfigDict)) and not isinstance(obj, DatasetDict)


def _turn_ok(turn: Any) -> bool:
    # The common case, checked fast; conversation_problems explains the rest.
    return (
        type(turn) is dict
        and type(turn.get("output")) is str
        and "input" in turn
        and type(turn["input"]) in (str, type(None))
        and type(turn.get("system")) in (str, type(None))
    )


def conversation_problems(conversation: Any) -> list[Problem]:
    """Lists what makes a conversation unusable (empty list when it is fine).

    ``input`` and ``system`` may be None (read as empty text); ``output`` must be a string.
    """
    if conversation is None:
        return [("missing", "no 'conversation' field")]
    if not isinstance(conversation, (list, tuple)):
        return [("missing", f"'conversation' is {type(conversation).__name__}, not a list")]
    if len(conversation) == 0:
        return [("empty", "the conversation has no turns")]
    if all(_turn_ok(turn) for turn in conversation):
        return []
    problems: list[Problem] = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, dict):
            problems.append(("missing", f"turn {i} is {type(turn).__name__}, not a dict"))
            continue
        if turn.get("output") is None:
            problems.append(("missing", f"turn {i} has no 'output'"))
        if "input" not in turn:
            problems.append(("missing", f"turn {i} has no 'input'"))
        for key in ("system", "input", "output"):
            value = turn.get(key)
            if value is not None and not isinstance(value, str):
                problems.append(
                    ("non_string", f"turn {i} '{key}' is {type(value).__name__}, not str")
                )
    return problems


def _classify(error: Exception) -> str:
    """The drop reason of an exception raised by a map function on one record."""
    if isinstance(error, KeyError):
        return "missing"
    message = str(error).lower()
    if any(s in message for s in ("must be a string", "must be a str", "not str", "not a str")):
        return "non_string"
    if any(s in message for s in ("has no", "missing", "no field")):
        return "missing"
    return "map_error"


def prepare_record(
    record: dict,
    dataset_map_fn=None,
    template_map_fn=None,
    rename_maps: Sequence[Sequence[str]] = (),
) -> tuple[dict | None, list[Problem]]:
    """Applies the map function, the template and the renames to one record.

    Mirrors ``datasets.Dataset.map``: the dict a function returns updates the record. A
    numeric record-level ``loss_weight`` is given to the turns that have none.

    Returns:
        ``(record, [])`` when the record is usable, else ``(record or None, problems)``.
    """
    if dataset_map_fn is not None:
        try:
            record = {**record, **dataset_map_fn(record)}
        except Exception as e:  # a map function may fail in any way on a bad record
            return None, [(_classify(e), f"the map function raised {type(e).__name__}: {e}")]
    if template_map_fn is not None:
        problems = conversation_problems(record.get("conversation"))
        if problems:
            return record, problems
        try:
            record = {**record, **template_map_fn(record)}
        except Exception as e:
            return record, [("map_error", f"the template raised {type(e).__name__}: {e}")]
    for old, new in rename_maps:
        if old in record:
            record[new] = record.pop(old)
    problems = conversation_problems(record.get("conversation"))
    if problems:
        return None, problems
    weight = record.get("loss_weight")
    if isinstance(weight, (int, float)) and not isinstance(weight, bool):
        # A per-record weight applies to the turns that have none of their own.
        record["conversation"] = [
            turn if turn.get("loss_weight") is not None else {**turn, "loss_weight": weight}
            for turn in record["conversation"]
        ]
    return record, []


def get_bos_eos_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The BOS and EOS ids of a tokenizer as lists (empty when it has none)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    return ([] if bos is None else [bos]), ([] if eos is None else [eos])


def _turn_value(turn: dict, key: str):
    value = turn.get(key)
    return TURN_DEFAULTS[key] if value is None else value


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens, in one batched call."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if hasattr(backend, "encode_batch_fast"):
        # What ``tokenizer(texts, add_special_tokens=False)`` does, without building the
        # offsets and attention masks it would return.
        if backend.truncation is not None:
            backend.no_truncation()
        if backend.padding is not None:
            backend.no_padding()
        backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    before = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=before[1:])
    return np.repeat(np.asarray(starts, dtype=np.int64) - before, lengths) + np.arange(total)


class EncodedBatch(NamedTuple):
    """Encoded conversations as flat arrays; sample ``i`` is ``[offsets[i], offsets[i + 1])``."""

    offsets: np.ndarray  # (n + 1,) int64
    input_ids: np.ndarray  # int64
    labels: np.ndarray  # int64
    loss_weight: np.ndarray  # float32
    has_weight: np.ndarray  # (n,) bool: a turn of the sample carries a loss_weight

    def sample(self, i: int) -> dict:
        """Sample ``i`` as lists (``loss_weight`` None when it has no weights)."""
        lo, hi = self.offsets[i], self.offsets[i + 1]
        weights = self.loss_weight[lo:hi].tolist() if self.has_weight[i] else None
        return {
            "input_ids": self.input_ids[lo:hi].tolist(),
            "labels": self.labels[lo:hi].tolist(),
            "loss_weight": weights,
        }


def encode_conversations(
    conversations: Sequence[Sequence[dict]],
    tokenizer,
    max_length: int | None = None,
    input_ids_with_output: bool = True,
    with_image_token: bool = False,
) -> EncodedBatch:
    """Encodes a batch of formatted conversations (see the module docstring for the layout).

    Each turn becomes a few pieces (BOS, input text, image token, output text, EOS, SEP); the
    distinct texts of the whole batch are tokenised in one call and the pieces are assembled
    with numpy, so no Python loop runs over tokens.

    Args:
        conversations: formatted conversations (after the template).
        tokenizer: a Hugging Face tokenizer.
        max_length: truncate each sample to this many tokens (None: no truncation).
        input_ids_with_output: encode the outputs too (False for evaluation prompts).
        with_image_token: replace ``<image>`` in inputs by ``IMAGE_TOKEN_INDEX``.

    Returns:
        The batch as flat arrays (``EncodedBatch``).
    """
    bos, eos = get_bos_eos_token_ids(tokenizer)
    # Piece sources 0-2 are fixed token lists; texts get slots from 3 on.
    sources: list[list[int]] = [bos, eos, [IMAGE_TOKEN_INDEX]]
    slots: dict[str, int] = {}
    piece_src: list[int] = []
    piece_train: list[bool] = []
    piece_weight: list[float] = []
    pieces_per_sample: list[int] = []
    has_weight: list[bool] = []

    def slot(text: str) -> int:
        index = slots.get(text)
        if index is None:
            index = slots[text] = len(slots) + 3
        return index

    for conversation in conversations:
        count = len(piece_src)
        weighted = False
        needs_bos = True
        for turn in conversation:
            weight = turn.get("loss_weight")
            weighted = weighted or weight is not None
            weight = 1.0 if weight is None else float(weight)
            turn_src = [0] if needs_bos and bos else []
            text = _turn_value(turn, "input")
            if with_image_token and DEFAULT_IMAGE_TOKEN in text:
                for k, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
                    turn_src += [slot(chunk)] if k == 0 else [2, slot(chunk)]
            else:
                turn_src.append(slot(text))
            turn_train = [False] * len(turn_src)
            if input_ids_with_output:
                with_loss = bool(_turn_value(turn, "output_with_loss"))
                turn_src.append(slot(_turn_value(turn, "output")))
                turn_train.append(with_loss)
                needs_bos = bool(_turn_value(turn, "need_eos_token"))
                if needs_bos and eos:
                    turn_src.append(1)
                    turn_train.append(with_loss)
            sep = _turn_value(turn, "sep")
            if sep:
                turn_src.append(slot(sep))
                turn_train.append(False)
            piece_src += turn_src
            piece_train += turn_train
            piece_weight += [weight] * len(turn_src)
        pieces_per_sample.append(len(piece_src) - count)
        has_weight.append(weighted)

    texts = list(slots)
    sources += _tokenize(tokenizer, texts) if texts else []
    src_len = np.fromiter(map(len, sources), dtype=np.int64, count=len(sources))
    src_start = np.zeros(len(sources), dtype=np.int64)
    np.cumsum(src_len[:-1], out=src_start[1:])
    flat = np.fromiter(
        itertools.chain.from_iterable(sources), dtype=np.int64, count=int(src_len.sum())
    )

    src = np.asarray(piece_src, dtype=np.int64)
    piece_len = src_len[src]
    input_ids = flat[ranges(src_start[src], piece_len)]
    train = np.repeat(np.asarray(piece_train, dtype=bool), piece_len)
    labels = np.where(train, input_ids, IGNORE_INDEX)
    loss_weight = np.repeat(np.asarray(piece_weight, dtype=np.float32), piece_len)

    sample_of_piece = np.repeat(np.arange(len(conversations)), pieces_per_sample)
    lengths = np.bincount(sample_of_piece, weights=piece_len, minlength=len(conversations))
    lengths = lengths.astype(np.int64)
    starts = np.zeros(len(conversations) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    if max_length is not None and (lengths > max_length).any():
        lengths = np.minimum(lengths, max_length)
        keep = ranges(starts[:-1], lengths)
        input_ids, labels, loss_weight = input_ids[keep], labels[keep], loss_weight[keep]
        np.cumsum(lengths, out=starts[1:])
    return EncodedBatch(starts, input_ids, labels, loss_weight, np.asarray(has_weight, dtype=bool))


def encode_fn(
    example: dict,
    tokenizer,
    max_length: int | None,
    input_ids_with_output: bool = True,
    with_image_token: bool = False,
) -> dict:
    """Encodes one record's ``conversation`` (the XTuner 0.x ``encode_fn`` signature).

    Returns:
        ``input_ids`` and ``labels``, plus ``loss_weight`` when a turn carries one.
    """
    result = encode_conversations(
        [example["conversation"]], tokenizer, max_length, input_ids_with_output, with_image_token
    ).sample(0)
    if result["loss_weight"] is None:
        del result["loss_weight"]
    return result


def list_column(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Row offsets (``n + 1``, int64) and flat numpy values of a list column (nulls: empty)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    lengths = [pc.list_value_length(c).fill_null(0).to_numpy() for c in chunks]
    values = [pc.list_flatten(c).to_numpy(zero_copy_only=False) for c in chunks]
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets, (np.concatenate(values) if values else np.zeros(0))


_MAX_CHUNK_VALUES = 2**30  # Arrow lists use int32 offsets: keep each chunk well below 2**31


def list_array(
    offsets: np.ndarray, values: np.ndarray, valid: np.ndarray | None = None
) -> pa.ChunkedArray:
    """A list column from int64 offsets and flat values, chunked to fit int32 offsets.

    Args:
        offsets: ``n + 1`` row offsets into ``values``.
        values: flat values.
        valid: optional per-row mask; False rows are null.
    """
    bounds = [0]
    while offsets[bounds[-1]] + _MAX_CHUNK_VALUES < offsets[-1]:
        nxt = int(np.searchsorted(offsets, offsets[bounds[-1]] + _MAX_CHUNK_VALUES, "right")) - 1
        bounds.append(max(nxt, bounds[-1] + 1))
    bounds.append(len(offsets) - 1)
    chunks = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        local = (offsets[lo : hi + 1] - offsets[lo]).astype(np.int32)
        mask = None if valid is None else pa.array(~valid[lo:hi])
        chunk_values = pa.array(values[offsets[lo] : offsets[hi]])
        chunks.append(pa.ListArray.from_arrays(pa.array(local), chunk_values, mask=mask))
    return pa.chunked_array(chunks)


def fill_loss_weight(table: pa.Table) -> pa.Table:
    """Makes ``loss_weight`` a full per-token column, or removes it when no row has one.

    Rows without weights (null) get 1.0 for each of their tokens.
    """
    if "loss_weight" not in table.column_names:
        return table
    weights = table.column("loss_weight")
    index = table.column_names.index("loss_weight")
    if weights.null_count == len(weights):
        return table.remove_column(index)
    if weights.null_count == 0:
        return table
    offsets, _ = list_column(table.column("input_ids"))
    _, given = list_column(weights)
    flat = np.ones(offsets[-1], dtype=np.float32)
    valid = np.flatnonzero(weights.is_valid().to_numpy(zero_copy_only=False))
    flat[ranges(offsets[valid], offsets[valid + 1] - offsets[valid])] = given
    return table.set_column(index, "loss_weight", list_array(offsets, flat))


def pack_table(table: pa.Table, max_length: int, order: np.ndarray | None = None) -> pa.Table:
    """Packs encoded samples into rows of ``max_length`` tokens.

    The samples (in ``order`` when given) are concatenated and cut every ``max_length``
    tokens. Every token is kept once: a sample may continue into the next row, and the last
    row holds the remainder (it may be shorter than ``max_length``).

    Args:
        table: ``input_ids``, ``labels`` and optionally a full ``loss_weight`` list column.
        max_length: tokens per row.
        order: a permutation of the rows to pack in (None: table order).

    Returns:
        A table with ``input_ids``, ``labels``, [``loss_weight``], ``cumulative_len`` (per row:
        0, the end of each piece of a sample, ..., the row length) and ``length``.
    """
    if max_length is None or max_length <= 0:
        raise ValueError(f"packing needs a positive max_length, got {max_length}")
    names = [c for c in ("input_ids", "labels", "loss_weight") if c in table.column_names]
    doc_offsets, _ = list_column(table.column("input_ids"))
    doc_lengths = np.diff(doc_offsets)
    gather = None
    if order is not None:
        order = np.asarray(order, dtype=np.int64)
        gather = ranges(doc_offsets[:-1][order], doc_lengths[order])
        doc_lengths = doc_lengths[order]
        np.cumsum(doc_lengths, out=doc_offsets[1:])
    total = int(doc_offsets[-1])
    row_offsets = np.r_[np.arange(0, total, max_length), total].astype(np.int64)
    num_rows = len(row_offsets) - 1

    out = {}
    for name in names:
        offsets, values = list_column(table.column(name))
        if len(values) != total:
            raise ValueError(f"'{name}' and 'input_ids' differ in length in some row")
        out[name] = list_array(row_offsets, values if gather is None else values[gather])

    # Boundaries inside rows: every sample end and every row end, each taken relative to the
    # start of the row it closes; then a 0 opens each row.
    bounds = np.union1d(doc_offsets[1:], row_offsets[1:])
    bounds = bounds[bounds > 0]
    row_of_bound = (bounds - 1) // max_length
    per_row = np.bincount(row_of_bound, minlength=num_rows) + 1
    cum_offsets = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(per_row, out=cum_offsets[1:])
    cum_values = np.zeros(cum_offsets[-1], dtype=np.int32)
    opens = np.zeros(cum_offsets[-1], dtype=bool)
    opens[cum_offsets[:-1]] = True
    cum_values[~opens] = bounds - row_of_bound * max_length
    out["cumulative_len"] = list_array(cum_offsets, cum_values)
    out["length"] = pa.array(np.diff(row_offsets).astype(np.int32))
    return pa.table(out)


def json_files(data_files) -> list[str]:
    """The file paths in a ``data_files`` argument of ``load_dataset`` (str, list or dict)."""
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [f for v in data_files.values() for f in json_files(v)]
    if isinstance(data_files, Iterable):
        return [f for v in data_files for f in json_files(v)]
    return []


def read_json_records(
    path: str, json_lines: bool = False
) -> list[tuple[int | None, Any, str | None]]:
    """Reads a JSON (a list of records) or JSON Lines file without stopping at bad records.

    Args:
        path: the file.
        json_lines: read it as JSON Lines even when it starts with ``[`` (lines that are
            lists, as in InternLM's chat data); otherwise a leading ``[`` means one document.

    Returns:
        One ``(line, record, error)`` per record: ``line`` is the 1-based line number (None for
        records of a JSON list), ``error`` a parse error message (``record`` is then None).
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not json_lines and text.lstrip().startswith("["):  # one JSON document
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            return [(e.lineno, None, f"invalid JSON ({e.msg}, column {e.colno})")]
        return [(None, record, None) for record in records]
    out: list[tuple[int | None, Any, str | None]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line), None))
        except json.JSONDecodeError as e:
            out.append((lineno, None, f"invalid JSON ({e.msg}, column {e.colno})"))
    return out


def find_json_error(data_files) -> str | None:
    """Finds the first unparsable record of local JSON/JSON Lines files.

    Returns:
        ``"FILE:LINE: message"`` for the first problem, or None when every file parses.
    """
    for path in json_files(data_files):
        if not osp.isfile(path):
            continue
        for lineno, _, error in read_json_records(path):
            if error is not None:
                return f"{path}:{lineno}: {error}"
    return None
