"""``process_hf_dataset``: raw records to tokenised (and packed) training samples.

Order of work (XTuner 0.x): load -> subset -> map fn -> template -> drop unusable records ->
rename -> tokenise -> drop samples with no trainable label -> pack -> ``length`` column.

Differences from 0.x that users see:

- map fn, template and tokenisation run as one batched pass on ``map_num_proc`` processes
  (clamped to the CPUs this process may use); packing works on whole Arrow columns.
- Unusable records are dropped with one counted warning instead of an exception deep inside
  ``datasets``; a JSON line that does not parse stops the run with its file and line.
- The result is saved under a cache directory keyed by a hash of everything it depends on, so
  a restart loads it instead of tokenising again. ``XTUNER_DATASET_CACHE`` sets the directory
  (default: ``<HF datasets cache>/xtuner_processed``); ``XTUNER_DATASET_CACHE=none`` turns
  the cache off in single-process runs.
- In distributed runs the first rank of each node processes (or loads the cache) and the other
  ranks of the node memory-map its result.
- Packing keeps the last, shorter row and always records ``cumulative_len``.
"""

from __future__ import annotations

import inspect
import logging
import os
import os.path as osp
import shutil
import tempfile
import uuid
from collections import Counter
from datetime import timedelta
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import (
    Dataset,
    DatasetDict,
    Features,
    List,
    Value,
    concatenate_datasets,
    load_from_disk,
)
from mmengine.logging import print_log
from mmengine.utils.misc import get_object_from_string

from xtuner.registry import BUILDER, MAP_FUNC

from .utils import (
    DROP_REASONS,
    TURN_DEFAULTS,
    encode_conversations,
    fill_loss_weight,
    find_json_error,
    is_config,
    list_array,
    pack_table,
    prepare_record,
)

__all__ = ["process_hf_dataset", "build_origin_dataset", "resolve_map_fn", "cache_root"]

# Bump when the processing changes what a cached result would contain.
_CACHE_FORMAT = "xtuner-processed-v1"
_SEED = 0  # subset and pre-pack shuffling are seeded so that cached results stay valid
_MIN_ROWS_PER_PROC = 2000  # below this a worker process costs more than it saves
_BATCH_SIZE = 1000

_ENCODED_FEATURES = Features(
    {
        "input_ids": List(Value("int32")),
        "labels": List(Value("int32")),
        "loss_weight": List(Value("float32")),
        "_drop": Value("string"),
    }
)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _num_proc(map_num_proc: int | None, num_rows: int) -> int:
    limit = max(1, num_rows // _MIN_ROWS_PER_PROC)
    return max(1, min(map_num_proc or 1, available_cpus(), limit))


def build_origin_dataset(dataset, split: str | None = "train") -> Dataset:
    """Builds the raw dataset from a config (or takes it) and selects ``split``.

    ``split=None`` concatenates every split. A local JSON file that does not parse raises a
    ``ValueError`` naming the file and line.
    """
    if is_config(dataset):
        cfg = dataset
        try:
            dataset = BUILDER.build(cfg)
        except Exception as e:
            where = find_json_error(cfg.get("data_files")) if cfg.get("data_files") else None
            if where is None:
                raise
            raise ValueError(
                f"cannot load the data set: {where}. Fix or remove that record; "
                "`xtuner check-custom-dataset CONFIG` lists every problem of the files."
            ) from e
    if isinstance(dataset, DatasetDict):
        if split is None:
            return concatenate_datasets(list(dataset.values()))
        if split not in dataset:
            raise KeyError(f"split={split!r} is not in the data set (has {list(dataset)})")
        return dataset[split]
    return dataset


def resolve_map_fn(dataset_map_fn):
    """A map function from a callable, a ``MAP_FUNC`` name or a dotted import path."""
    if dataset_map_fn is None or callable(dataset_map_fn):
        return dataset_map_fn
    if isinstance(dataset_map_fn, str):
        import xtuner.dataset.map_fns  # noqa: F401 (registers the bundled map functions)

        fn = MAP_FUNC.get(dataset_map_fn)
        if fn is None and "." in dataset_map_fn:
            fn = get_object_from_string(dataset_map_fn)
        if fn is not None:
            return fn
    raise TypeError(
        f"dataset_map_fn={dataset_map_fn!r} is neither a function, a registered map function "
        "(`xtuner list-dataset-format` lists them) nor an importable dotted path"
    )


def _build(obj):
    return BUILDER.build(obj) if is_config(obj) else obj


def cache_root() -> str | None:
    """The directory of processed data sets, or None when caching is turned off."""
    value = os.environ.get("XTUNER_DATASET_CACHE")
    if value is None:
        import datasets.config

        return osp.join(str(datasets.config.HF_DATASETS_CACHE), "xtuner_processed")
    if value.strip().lower() in ("", "0", "none", "off", "false"):
        return None
    return osp.expanduser(value)


def _tokenizer_digest(tokenizer) -> str:
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(tokenizer)
    return Hasher.hash(
        [
            type(tokenizer).__name__,
            backend.to_str(),
            sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items()),
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
        ]
    )


def _module_source(obj) -> str:
    module = inspect.getmodule(obj)
    try:
        return inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):  # built-in or interactively defined
        return ""


def _callable_digest(fn) -> list:
    """What a map function's result depends on: its arguments and the source of its module.

    Functions pickle by reference, so a hash of the function alone would miss edits to it.
    """
    if fn is None:
        return [None]
    if isinstance(fn, partial):
        return [*_callable_digest(fn.func), fn.args, sorted(fn.keywords.items())]
    return [
        getattr(fn, "__module__", None),
        getattr(fn, "__qualname__", None),
        _module_source(fn),
        fn,
    ]


def _cache_key(dataset: Dataset, tokenizer, map_fn, template_fn, options: dict) -> str | None:
    """A hash of everything the processed data depends on (None when something won't hash)."""
    from datasets.fingerprint import Hasher

    from xtuner.version import __version__

    from . import utils

    try:
        hasher = Hasher()
        for part in (
            _CACHE_FORMAT,
            __version__,
            _module_source(utils),  # the encoding and packing rules
            dataset._fingerprint,
            len(dataset),
            None if tokenizer is None else _tokenizer_digest(tokenizer),
            _callable_digest(map_fn),
            _callable_digest(template_fn),
            sorted(options.items()),
        ):
            hasher.update(part)
        return hasher.hexdigest()
    except Exception as e:  # an unpicklable user function: process without a cache
        print_log(f"processed data set not cached: cannot hash its inputs ({e})", "current")
        return None


def _encode_batch(
    batch: dict[str, list],
    map_fn=None,
    template_fn=None,
    rename_maps=(),
    tokenizer=None,
    max_length=None,
    input_ids_with_output=True,
    with_image_token=False,
) -> pa.Table:
    """Maps, formats and encodes a batch; unusable rows get empty ids and a ``_drop`` reason."""
    keys = list(batch)
    num = len(batch[keys[0]])
    drops = [""] * num
    conversations, rows = [], []
    for i in range(num):
        record = {key: batch[key][i] for key in keys}
        if record.get("_drop"):
            drops[i] = record["_drop"]
            continue
        record, problems = prepare_record(record, map_fn, template_fn, rename_maps)
        if problems:
            drops[i] = "|".join(problems[0])
            continue
        conversation = record["conversation"]
        if record.get("_has_weight") is False:  # _map_batch filled in default weights
            conversation = [{**turn, "loss_weight": None} for turn in conversation]
        conversations.append(conversation)
        rows.append(i)
    encoded = encode_conversations(
        conversations, tokenizer, max_length, input_ids_with_output, with_image_token
    )
    rows = np.asarray(rows, dtype=np.int64)
    lengths = np.diff(encoded.offsets)
    sample_of_token = np.repeat(np.arange(len(rows)), lengths)
    keep = np.ones(len(rows), dtype=bool)
    if input_ids_with_output:
        trained = np.bincount(sample_of_token, encoded.labels >= 0, minlength=len(rows))
        keep = trained > 0
        for i in rows[~keep]:
            drops[i] = "no_trainable|no output token is trained (after truncation to max_length)"
    token_keep = keep[sample_of_token]
    row_len = np.zeros(num, dtype=np.int64)
    row_len[rows[keep]] = lengths[keep]
    offsets = np.zeros(num + 1, dtype=np.int64)
    np.cumsum(row_len, out=offsets[1:])
    weighted = np.zeros(num, dtype=bool)
    weighted[rows[keep]] = encoded.has_weight[keep]
    weight_offsets = np.zeros(num + 1, dtype=np.int64)
    np.cumsum(np.where(weighted, row_len, 0), out=weight_offsets[1:])
    weights = encoded.loss_weight[token_keep & encoded.has_weight[sample_of_token]]
    return pa.table(
        {
            "input_ids": list_array(offsets, encoded.input_ids[token_keep].astype(np.int32)),
            "labels": list_array(offsets, encoded.labels[token_keep].astype(np.int32)),
            "loss_weight": list_array(weight_offsets, weights, valid=weighted),
            "_drop": pa.array(drops, pa.string()),
        }
    )


def _canonical_turn(turn: dict) -> dict:
    # Every turn gets every key with a typed value, so Arrow infers one schema for all batches.
    filled = {
        k: default if turn.get(k) is None else turn[k] for k, default in TURN_DEFAULTS.items()
    }
    return {**turn, **filled}


def _map_batch(batch: dict[str, list], map_fn=None, template_fn=None, rename_maps=()):
    """Map fn + template + renames on a batch, keeping every column (no tokenisation)."""
    keys = list(batch)
    num = len(batch[keys[0]])
    rows = []
    for i in range(num):
        original = {key: batch[key][i] for key in keys}
        record, problems = prepare_record(original, map_fn, template_fn, rename_maps)
        if problems:
            rows.append({**original, "conversation": [], "_drop": "|".join(problems[0])})
            continue
        turns = record["conversation"]
        has_weight = any(t.get("loss_weight") is not None for t in turns)
        record["conversation"] = [_canonical_turn(t) for t in turns]
        rows.append({**record, "_drop": "", "_has_weight": has_weight})
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in columns}


def _flag_untrainable(batch: dict[str, list]) -> dict[str, list]:
    return {
        "_drop": [
            "" if max(labels, default=-1) >= 0 else "no_trainable|no label is trained"
            for labels in batch["labels"]
        ]
    }


def _map_kwargs(num_proc: int, desc: str) -> dict:
    return dict(
        batched=True,
        batch_size=_BATCH_SIZE,
        num_proc=num_proc if num_proc > 1 else None,
        keep_in_memory=True,
        load_from_cache_file=False,
        desc=desc,
    )


def _drop_rows(table: pa.Table, total: int) -> pa.Table:
    """Removes rows with a ``_drop`` reason and logs one counted warning."""
    if "_drop" not in table.column_names:
        return table
    flags = table.column("_drop")
    keep = pc.equal(flags, "")
    dropped = pc.filter(flags, pc.invert(keep)).to_pylist()
    table = table.filter(keep).drop_columns(
        [c for c in ("_drop", "_has_weight") if c in table.column_names]
    )
    if not dropped:
        return table
    counts = Counter(reason.split("|", 1)[0] for reason in dropped)
    summary = ", ".join(f"{n} {DROP_REASONS[code]}" for code, n in counts.most_common())
    if table.num_rows == 0:
        first = int(pc.index(pc.equal(flags, ""), False).as_py())
        raise ValueError(
            f"every record was dropped ({summary}); record {first}: "
            f"{dropped[0].split('|', 1)[1]}. Check that dataset_map_fn fits the data "
            "(`xtuner list-dataset-format`) or run `xtuner check-custom-dataset CONFIG`."
        )
    print_log(f"dropped {len(dropped)} of {total} records: {summary}", "current", logging.WARNING)
    return table


def _process(
    dataset: Dataset,
    *,
    do_dataset_tokenization: bool,
    tokenizer,
    max_length: int | None,
    map_fn,
    template_fn,
    max_dataset_length: int | None,
    remove_unused_columns: bool,
    rename_maps,
    shuffle_before_pack: bool,
    pack_to_max_length: bool,
    input_ids_with_output: bool,
    with_image_token: bool,
    map_num_proc: int,
) -> pa.Table:
    """The whole pipeline on this process; returns the final Arrow table."""
    rng = np.random.default_rng(_SEED)
    if max_dataset_length is not None and max_dataset_length < len(dataset):
        dataset = dataset.select(rng.choice(len(dataset), max_dataset_length, replace=False))
    total = len(dataset)
    num_proc = _num_proc(map_num_proc, total)
    rename_maps = [tuple(pair) for pair in rename_maps]
    remove = remove_unused_columns or pack_to_max_length

    if do_dataset_tokenization:
        if tokenizer is None:
            raise ValueError("process_hf_dataset needs a tokenizer when it tokenises the data")
        encode_kwargs = dict(
            tokenizer=tokenizer,
            max_length=max_length,
            input_ids_with_output=input_ids_with_output,
            with_image_token=with_image_token,
        )
        if remove:
            encoded = dataset.map(
                _encode_batch,
                fn_kwargs=dict(
                    map_fn=map_fn, template_fn=template_fn, rename_maps=rename_maps, **encode_kwargs
                ),
                remove_columns=dataset.column_names,
                features=_ENCODED_FEATURES,
                **_map_kwargs(num_proc, "xtuner: map, template, tokenize"),
            )
            table = encoded.data.table
        else:
            mapped = dataset.map(
                _map_batch,
                fn_kwargs=dict(map_fn=map_fn, template_fn=template_fn, rename_maps=rename_maps),
                remove_columns=dataset.column_names,
                **_map_kwargs(num_proc, "xtuner: map, template"),
            )
            encoded = mapped.map(
                _encode_batch,
                fn_kwargs=encode_kwargs,
                remove_columns=mapped.column_names,
                features=_ENCODED_FEATURES,
                **_map_kwargs(num_proc, "xtuner: tokenize"),
            )
            table = mapped.data.table.drop_columns(["_drop"])
            for name in encoded.column_names:
                table = table.append_column(name, encoded.data.table.column(name))
    else:
        for fn in (map_fn, template_fn):
            if fn is not None:
                dataset = dataset.map(fn, num_proc=num_proc if num_proc > 1 else None)
        for old, new in rename_maps:
            dataset = dataset.rename_column(old, new)
        if not {"input_ids", "labels"}.issubset(dataset.column_names):
            raise ValueError(
                "do_dataset_tokenization=False needs 'input_ids' and 'labels' columns, found "
                f"{dataset.column_names}"
            )
        if remove:
            kept = [c for c in ("input_ids", "labels", "loss_weight") if c in dataset.column_names]
            dataset = dataset.select_columns(kept)
        table = dataset.flatten_indices(keep_in_memory=True).data.table
        if input_ids_with_output:
            flags = dataset.map(
                _flag_untrainable,
                remove_columns=dataset.column_names,
                **_map_kwargs(num_proc, "xtuner: check labels"),
            )
            table = table.append_column("_drop", flags.data.table.column("_drop"))

    table = fill_loss_weight(_drop_rows(table, total))
    if pack_to_max_length:
        order = rng.permutation(table.num_rows) if shuffle_before_pack else None
        return pack_table(table, max_length, order)
    return table.append_column(
        "length", pc.list_value_length(table.column("input_ids")).cast(pa.int32())
    )


def _save(table: pa.Table, path: str) -> None:
    """Writes the table as a data set directory at ``path`` (atomically)."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    Dataset(table).save_to_disk(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another process wrote the same result first
        shutil.rmtree(tmp, ignore_errors=True)


def _prepare(kwargs: dict, need_path: bool) -> tuple[str | None, Dataset | None]:
    """Loads the cached result or processes and caches it.

    Returns:
        ``(path, None)`` when the result is on disk at ``path``, else ``(None, dataset)``.
    """
    options = dict(kwargs)
    tokenizer = _build(options.pop("tokenizer"))
    map_fn = resolve_map_fn(options.pop("dataset_map_fn"))
    template_fn = _build(options.pop("template_map_fn"))
    dataset = build_origin_dataset(options.pop("dataset"), options.pop("split"))
    map_num_proc = options.pop("map_num_proc")
    options.pop("use_varlen_attn")  # cumulative_len is always recorded when packing

    root = cache_root()
    key = _cache_key(dataset, tokenizer, map_fn, template_fn, options) if root else None
    if root and key:
        path = osp.join(root, key)
        if osp.isdir(path):
            print_log(f"loading the processed data set from {path}", "current")
            return path, None
    elif need_path:
        path = osp.join(tempfile.gettempdir(), f"xtuner_dataset_{uuid.uuid4().hex}")
    else:
        path = None

    table = _process(
        dataset,
        tokenizer=tokenizer,
        map_fn=map_fn,
        template_fn=template_fn,
        map_num_proc=map_num_proc,
        **options,
    )
    if path is None:
        return None, Dataset(table)
    os.makedirs(osp.dirname(path), exist_ok=True)
    _save(table, path)
    print_log(f"saved the processed data set to {path}", "current")
    return path, None


def _distributed_prepare(kwargs: dict) -> Dataset:
    """The first rank of each node prepares; the other ranks of the node load its result."""
    import torch.distributed as dist

    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    minutes = int(os.environ.get("XTUNER_DATASET_TIMEOUT", 60))
    group = dist.new_group(backend="gloo", timeout=timedelta(minutes=minutes))
    message = None
    if local_rank == 0:
        try:
            message = ("ok", _prepare(kwargs, need_path=True)[0])
        except Exception as e:
            message = ("error", f"{type(e).__name__}: {e}")
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, message, group=group)
            raise
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, message, group=group)
    status, value = gathered[rank - local_rank]
    if status == "error":
        raise RuntimeError(f"rank {rank - local_rank} failed to process the data set: {value}")
    return load_from_disk(value)


def process_hf_dataset(
    dataset,
    do_dataset_tokenization: bool = True,
    tokenizer=None,
    max_length: int | None = None,
    dataset_map_fn=None,
    template_map_fn=None,
    max_dataset_length: int | None = None,
    split: str | None = "train",
    remove_unused_columns: bool = False,
    rename_maps=[],  # noqa: B006 (the XTuner 0.x signature; never mutated)
    shuffle_before_pack: bool = True,
    pack_to_max_length: bool = True,
    use_varlen_attn: bool = False,
    input_ids_with_output: bool = True,
    with_image_token: bool = False,
    map_num_proc: int = 32,
) -> Dataset:
    """Turns a raw data set into tokenised (and packed) training samples.

    Args:
        dataset: a ``datasets.Dataset``/``DatasetDict`` or a config that builds one.
        do_dataset_tokenization: tokenise here; False for data that already has
            ``input_ids`` and ``labels``.
        tokenizer: a Hugging Face tokenizer or its config.
        max_length: samples are truncated to it, and packed rows hold this many tokens.
        dataset_map_fn: record -> ``{'conversation': [...]}``: a function, a ``MAP_FUNC`` name
            or a dotted import path.
        template_map_fn: formats each turn with a prompt template (or its config, usually
            ``dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.x)``).
        max_dataset_length: keep a seeded random subset of this many records.
        split: the split to take from a ``DatasetDict`` (None: all, concatenated).
        remove_unused_columns: keep only the model inputs (always so when packing).
        rename_maps: ``[(old, new), ...]`` column renames applied before tokenisation.
        shuffle_before_pack: shuffle samples (seeded) before packing.
        pack_to_max_length: concatenate samples into rows of ``max_length`` tokens.
        use_varlen_attn: attention stays inside each packed document (needs packing;
            ``cumulative_len`` is recorded either way).
        input_ids_with_output: encode the outputs (False for evaluation prompts).
        with_image_token: turn ``<image>`` into ``IMAGE_TOKEN_INDEX``.
        map_num_proc: most worker processes; clamped to the CPUs available and the data size.

    Returns:
        A ``datasets.Dataset`` with ``input_ids``, ``labels``, ``length``, plus
        ``cumulative_len`` when packed and ``loss_weight`` when the data has per-turn weights.
    """
    if use_varlen_attn and not pack_to_max_length:
        raise ValueError("use_varlen_attn=True needs pack_to_max_length=True")
    if pack_to_max_length and split not in ("train", None):
        raise ValueError(f"pack_to_max_length=True needs split='train' or None, got {split!r}")
    if pack_to_max_length and not max_length:
        raise ValueError("pack_to_max_length=True needs max_length")
    kwargs = dict(
        dataset=dataset,
        do_dataset_tokenization=do_dataset_tokenization,
        tokenizer=tokenizer,
        max_length=max_length,
        dataset_map_fn=dataset_map_fn,
        template_map_fn=template_map_fn,
        max_dataset_length=max_dataset_length,
        split=split,
        remove_unused_columns=remove_unused_columns,
        rename_maps=list(rename_maps),
        shuffle_before_pack=shuffle_before_pack,
        pack_to_max_length=pack_to_max_length,
        use_varlen_attn=use_varlen_attn,
        input_ids_with_output=input_ids_with_output,
        with_image_token=with_image_token,
        map_num_proc=map_num_proc,
    )
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _distributed_prepare(kwargs)
    path, result = _prepare(kwargs, need_path=False)
    return load_from_disk(path) if path is not None else result
