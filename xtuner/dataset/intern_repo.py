"""Data folders of InternLM's training repository (InternEvo), packed for training.

Two kinds of folder, each read file by file (a list of data sets, one per file):

- **tokenized** (:func:`load_intern_repo_tokenized_dataset`): ``*.bin`` files of JSON lines
  ``{"tokens": [...]}`` where a negative id ``-t`` is token ``t`` without loss (a label of
  ``-100``); token 0 is never trained on. ``FILE.bin.meta`` (``numpy.save`` of one
  ``(byte offset, length)`` row per line) is written next to each file by
  ``xtuner tokenize_ftdp_datasets``; when present it is checked against the file.
- **untokenized** (:func:`load_intern_repo_untokenized_dataset`): ``*.json`` files of JSON lines,
  each line a list of OpenAI-style messages (``role``, ``content``), processed as
  ``process_hf_dataset`` does with ``openai_map_fn`` and the config's template (bad records
  are counted, skipped and named in one warning); or a ``DatasetDict`` saved with
  ``save_to_disk`` whose keys are the file numbers ``"0"``, ``"1"``, ...

The files are read in the order of ``data_order_path`` (a text file of paths relative to the
folder, one a line: ``xtuner get_data_order`` writes it) or else sorted by path, walking
sub-folders in sorted order.

:func:`build_packed_dataset` packs each file's samples on its own, in the order of
``numpy.random.RandomState(seed).shuffle`` (InternEvo's order), into rows of ``packed_length``
tokens (:func:`xtuner.dataset.utils.pack_table`: ``cumulative_len`` marks the pieces, for
``use_varlen_attn``), and concatenates the files. The rows are those of XTuner 0.x, plus the
last, shorter row of each file that upstream dropped: every token is trained on once.
"""

from __future__ import annotations

import os
import os.path as osp
from typing import Any

import numpy as np
import pyarrow as pa
from mmengine.logging import print_log
from torch.utils.data import ConcatDataset, Dataset

from xtuner.registry import BUILDER
from xtuner.utils.constants import IGNORE_INDEX

from .utils import (
    fill_loss_weight,
    is_config,
    list_array,
    list_column,
    pack_table,
    read_json_records,
)

__all__ = [
    "PackedDataset",
    "build_packed_dataset",
    "list_data_files",
    "load_intern_repo_tokenized_dataset",
    "load_intern_repo_untokenized_dataset",
    "read_tokenized_file",
]


def list_data_files(folder: str, file_type: str) -> list[str]:
    """Paths (relative to ``folder``) of its files ending in ``file_type``, in InternEvo's
    order: sub-folders walked in sorted order, files sorted within each."""
    if not osp.isdir(folder):
        raise FileNotFoundError(f"data folder {folder} does not exist")
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(file_type):
                found.append(osp.relpath(osp.join(root, name), folder))
    return found


def _data_order(folder: str, data_order_path: str | None, file_type: str) -> list[str]:
    """Absolute paths of the files to read, in order."""
    if not osp.isdir(folder):
        raise FileNotFoundError(f"data folder {folder} does not exist")
    if data_order_path is None:
        return [osp.join(folder, p) for p in list_data_files(folder, file_type)]
    paths = []
    with open(data_order_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            name = line.strip()
            if not name:
                continue
            path = osp.join(folder, name)
            if not osp.isfile(path):
                raise FileNotFoundError(
                    f"{data_order_path}:{lineno}: {name} is not a file under {folder}; "
                    "rewrite the list with 'xtuner get_data_order'"
                )
            paths.append(path)
    return paths


def read_tokenized_file(path: str, min_length: int = 0) -> pa.Table:
    """One tokenized ``.bin`` file as a table of ``input_ids``, ``labels`` and ``length``.

    Raises:
        ValueError: a line is not JSON or has no list of integer ``tokens``, or the file's
            ``.meta`` does not describe it.
    """
    offsets, tokens = [0], []
    for i, (lineno, record, error) in enumerate(read_json_records(path, json_lines=True)):
        where = f"{path}:{lineno if lineno is not None else i + 1}"
        if error is not None:
            raise ValueError(f"{where}: {error}")
        ids = record.get("tokens") if isinstance(record, dict) else None
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise ValueError(
                f'{where}: a tokenized line must be {{"tokens": [int, ...]}}; write the '
                "folder with 'xtuner tokenize_ftdp_datasets'"
            )
        tokens.extend(ids)
        offsets.append(len(tokens))
    offsets = np.asarray(offsets, dtype=np.int64)
    signed = np.asarray(tokens, dtype=np.int64)
    lengths = np.diff(offsets)
    meta_path = f"{path}.meta"
    if osp.isfile(meta_path):
        meta = np.load(meta_path)
        if meta.ndim != 2 or len(meta) != len(lengths) or (meta[:, -1] != lengths).any():
            raise ValueError(
                f"{meta_path} does not match {path} ({len(meta)} rows for {len(lengths)} "
                "lines, or other lengths): it is stale; tokenize the folder again"
            )
    keep = np.flatnonzero(lengths >= min_length)
    table = pa.table(
        {
            "input_ids": list_array(offsets, np.abs(signed)),
            "labels": list_array(offsets, np.where(signed > 0, signed, IGNORE_INDEX)),
            "length": pa.array(lengths.astype(np.int32)),
        }
    )
    return table if len(keep) == len(lengths) else table.take(pa.array(keep))


def load_intern_repo_tokenized_dataset(
    folder: str,
    min_length: int = 0,
    data_order_path: str | None = None,
    file_type: str = ".bin",
) -> list:
    """The tokenized files of ``folder``, one ``datasets.Dataset`` per non-empty file.

    Args:
        folder: the tokenized folder (e.g. ``.../chatml_llamav13_32k/train``).
        min_length: samples shorter than this are left out.
        data_order_path: the file order (see the module docstring); None: sorted paths.
        file_type: the ending of the data files.
    """
    from datasets import Dataset as HFDataset

    datasets = []
    for path in _data_order(folder, data_order_path, file_type):
        print_log(f"Reading {path}...", logger="current")
        table = read_tokenized_file(path, min_length)
        if len(table):
            datasets.append(HFDataset(table))
    if not datasets:
        raise ValueError(f"no sample in the {file_type} files of {folder}")
    return datasets


def _messages_records(path: str) -> list[dict]:
    """The lines of an untokenized file as ``{'messages': [...]}`` records."""
    records = []
    for lineno, record, error in read_json_records(path, json_lines=True):
        if error is not None:
            raise ValueError(f"{path}:{lineno}: {error}; each line must be a JSON list of messages")
        # A line is a list of messages (InternEvo), or a record that holds them.
        records.append(record if isinstance(record, dict) else {"messages": record})
    return records


def load_intern_repo_untokenized_dataset(
    processed_dataset_dict_path: str | None = None,
    folder: str | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    template_map_fn: Any = None,
    data_order_path: str | None = None,
    file_type: str = ".json",
) -> list:
    """The untokenized files of ``folder``, tokenised, one ``datasets.Dataset`` per file.

    Args:
        processed_dataset_dict_path: a saved ``DatasetDict`` of already processed files
            (keys ``"0"``, ``"1"``, ...), read instead of ``folder``.
        folder: the folder of JSON Lines files of messages.
        tokenizer: a tokenizer or its config.
        max_length: samples are truncated to it.
        template_map_fn: the prompt template (config), e.g.
            ``dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.internlm2_chat)``.
        data_order_path: the file order (see the module docstring); None: sorted paths.
        file_type: the ending of the data files.
    """
    from datasets import Dataset as HFDataset
    from datasets import load_from_disk

    from .huggingface import process_hf_dataset
    from .map_fns import openai_map_fn

    if processed_dataset_dict_path is not None:
        saved = load_from_disk(processed_dataset_dict_path)
        return [saved[key] for key in sorted(saved, key=int)]
    if folder is None or tokenizer is None or not max_length:
        raise ValueError(
            "load_intern_repo_untokenized_dataset needs processed_dataset_dict_path, or "
            "folder, tokenizer and max_length"
        )
    datasets = []
    for path in _data_order(folder, data_order_path, file_type):
        print_log(f"Reading {path}...", logger="current")
        dataset = process_hf_dataset(
            HFDataset.from_list(_messages_records(path)),
            tokenizer=tokenizer,
            max_length=max_length,
            dataset_map_fn=openai_map_fn,
            template_map_fn=template_map_fn,
            split=None,
            remove_unused_columns=True,
            pack_to_max_length=False,
        )
        if len(dataset):
            datasets.append(dataset)
    if not datasets:
        raise ValueError(f"no usable sample in the {file_type} files of {folder}")
    return datasets


def _as_table(dataset) -> pa.Table:
    """``input_ids``, ``labels`` (and ``loss_weight``) of a data set as an Arrow table."""
    from datasets import Dataset as HFDataset

    if isinstance(dataset, HFDataset):
        table = dataset.with_format("arrow")[:]
    else:  # any map-style data set of dict samples
        samples = [dataset[i] for i in range(len(dataset))]
        columns = ["input_ids", "labels"] + (["loss_weight"] if "loss_weight" in samples[0] else [])
        table = pa.table({c: [s[c] for s in samples] for c in columns})
    names = [c for c in ("input_ids", "labels", "loss_weight") if c in table.column_names]
    return fill_loss_weight(table.select(names))


class PackedDataset(Dataset):
    """One data set's samples, shuffled with ``seed`` and packed into rows of
    ``packed_length`` tokens (see the module docstring).

    Args:
        dataset: a ``datasets.Dataset`` (or any data set of ``input_ids``/``labels`` dicts).
        packed_length: tokens per row.
        seed: the shuffling seed (1024 is InternEvo's).
    """

    def __init__(self, dataset, packed_length: int = 8192, seed: int = 1024) -> None:
        from datasets import Dataset as HFDataset

        table = _as_table(dataset)
        order = np.arange(len(table))
        np.random.RandomState(seed).shuffle(order)
        self.packed_length = packed_length
        self.seed = seed
        self.data = HFDataset(pack_table(table, packed_length, order))
        offsets, _ = list_column(table.column("input_ids"))
        self.num_tokens = int(offsets[-1])

    @property
    def length(self) -> list[int]:
        """Tokens of each row."""
        return list(self.data["length"])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.data[index]


def build_packed_dataset(
    dataset_cfg: Any, packed_length: int = 8192, seed: int = 1024
) -> ConcatDataset:
    """Packs each data set that ``dataset_cfg`` gives (a config, a data set or a list of
    them) with :class:`PackedDataset` and concatenates them.

    Every process builds the same rows (loading and packing are deterministic), so no
    broadcast is needed under data parallel.
    """
    datasets = BUILDER.build(dataset_cfg) if is_config(dataset_cfg) else dataset_cfg
    if not isinstance(datasets, (list, tuple)):
        datasets = [datasets]
    parts = [BUILDER.build(d) if is_config(d) else d for d in datasets]
    return ConcatDataset([PackedDataset(d, packed_length, seed) for d in parts])
