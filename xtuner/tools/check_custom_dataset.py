"""``xtuner check-custom-dataset CONFIG``: report every problem of a config's data in one pass.

Each data set that ``train_dataloader.dataset`` builds with ``process_hf_dataset`` (also inside a
``ConcatDataset``) is read record by record: local JSON/JSON Lines files directly, so a line
that does not parse is reported with the others; other sources through ``datasets``. Every
record goes through the config's map function, template and tokenizer, and each problem is
printed with its file, line and record index. Exit status 1 when a problem was found.
"""

from __future__ import annotations

import argparse
import os.path as osp
from collections import Counter
from collections.abc import Iterator

import numpy as np

from xtuner.dataset.utils import (
    DROP_REASONS,
    encode_conversations,
    is_config,
    json_files,
    prepare_record,
    read_json_records,
)
from xtuner.registry import BUILDER

from .utils import UserError, load_config, run_tool

PROG = "xtuner check-custom-dataset"
_PROCESSORS = ("process_hf_dataset", "process_ms_dataset")
_CHUNK = 1000


def _type_name(cfg) -> str:
    kind = cfg.get("type")
    return kind.rsplit(".", 1)[-1] if isinstance(kind, str) else getattr(kind, "__name__", "")


def processing_configs(cfg, where: str) -> Iterator[tuple[str, dict]]:
    """``(config path, config)`` of every ``process_hf_dataset`` call inside ``cfg``."""
    if not is_config(cfg):
        return
    if _type_name(cfg) in _PROCESSORS:
        yield where, cfg
    for i, part in enumerate(cfg.get("datasets") or []):
        yield from processing_configs(part, f"{where}.datasets[{i}]")


def _records(target: dict) -> Iterator[tuple[str, object, str | None]]:
    """``(where, record, parse error)`` for every record of the target's raw data."""
    source = target.get("dataset")
    files = json_files(source.get("data_files")) if is_config(source) else []
    if source.get("path") == "json" and files and all(osp.isfile(f) for f in files):
        for path in files:
            for i, (line, record, error) in enumerate(read_json_records(path)):
                where = f"{path}:{line} (record {i})" if line else f"{path} (record {i})"
                yield where, record, error
        return
    from xtuner.dataset.huggingface import build_origin_dataset  # imports `datasets`

    for i, record in enumerate(build_origin_dataset(source, target.get("split", "train"))):
        yield f"record {i}", record, None


def _check_chunk(chunk, target, tokenizer, map_fn, template_fn) -> tuple[list, int]:
    """Problems ``(where, code, detail)`` of a chunk of records, and how many were truncated."""
    problems, usable = [], []
    for where, record, error in chunk:
        if error is not None:
            problems.append((where, "parse", error))
            continue
        if not isinstance(record, dict):
            problems.append((where, "missing", f"a record must be an object, got {record!r:.40}"))
            continue
        prepared, found = prepare_record(
            record, map_fn, template_fn, target.get("rename_maps") or []
        )
        problems += [(where, code, detail) for code, detail in found]
        if not found:
            usable.append((where, prepared["conversation"]))
    if not usable or not target.get("do_dataset_tokenization", True):
        return problems, 0
    with_output = target.get("input_ids_with_output", True)
    encoded = encode_conversations(
        [conversation for _, conversation in usable],
        tokenizer,
        None,
        with_output,
        target.get("with_image_token", False),
    )
    max_length = target.get("max_length")
    lengths = np.diff(encoded.offsets)
    truncated = 0
    for i, (where, _) in enumerate(usable):
        labels = encoded.labels[encoded.offsets[i] : encoded.offsets[i + 1]]
        if max_length is not None:
            truncated += int(lengths[i] > max_length)
            labels = labels[:max_length]
        if with_output and not (labels >= 0).any():
            cut = (
                f" after truncation to max_length={max_length}" if lengths[i] > len(labels) else ""
            )
            problems.append((where, "no_trainable", f"no output token is trained{cut}"))
    return problems, truncated


def check_dataset(target: dict, max_printed: int) -> int:
    """Checks one ``process_hf_dataset`` config; prints its problems; returns their count."""
    from xtuner.dataset.huggingface import resolve_map_fn

    tokenizer = target.get("tokenizer")
    tokenizer = BUILDER.build(tokenizer) if is_config(tokenizer) else tokenizer
    if tokenizer is None and target.get("do_dataset_tokenization", True):
        raise UserError("the data set config has no tokenizer")
    map_fn = resolve_map_fn(target.get("dataset_map_fn"))
    template_fn = target.get("template_map_fn")
    template_fn = BUILDER.build(template_fn) if is_config(template_fn) else template_fn

    problems, total, truncated, chunk = [], 0, 0, []
    for item in _records(target):
        chunk.append(item)
        total += 1
        if len(chunk) == _CHUNK:
            found, cut = _check_chunk(chunk, target, tokenizer, map_fn, template_fn)
            problems, truncated, chunk = problems + found, truncated + cut, []
    found, cut = _check_chunk(chunk, target, tokenizer, map_fn, template_fn)
    problems, truncated = problems + found, truncated + cut

    for where, code, detail in problems[:max_printed]:
        label = "" if code == "parse" else f"{DROP_REASONS[code]}: "  # detail says invalid JSON
        print(f"  {where}: {label}{detail}")
    if len(problems) > max_printed:
        print(f"  ... and {len(problems) - max_printed} more")
    bad = len({where for where, _, _ in problems})
    counts = Counter(
        "invalid JSON" if code == "parse" else DROP_REASONS[code] for _, code, _ in problems
    )
    summary = ", ".join(f"{n} {label}" for label, n in counts.most_common())
    print(
        f"  {total} records, {total - bad} usable" + (f"; problems: {summary}" if summary else "")
    )
    if truncated:
        print(
            f"  note: {truncated} records are longer than max_length={target.get('max_length')} "
            "and get truncated"
        )
    if total and bad == total:
        print(
            "  every record failed: check that dataset_map_fn fits the data "
            "(`xtuner list-dataset-format` lists the formats)"
        )
    return len(problems)


def _run(args) -> int:
    cfg = load_config(args.config)
    if "train_dataloader" in cfg:
        root, where = cfg.train_dataloader.get("dataset"), "train_dataloader.dataset"
    else:
        root, where = cfg.get("train_dataset"), "train_dataset"
    targets = list(processing_configs(root, where))
    if not targets:
        raise UserError(
            f"{where} is not built with process_hf_dataset (or a ConcatDataset of them); "
            "nothing to check"
        )
    found = 0
    for name, target in targets:
        print(f"{name}:")
        found += check_dataset(target, args.max_problems)
    print("no problems found" if not found else f"{found} problems found")
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="config file path or bundled config name")
    parser.add_argument(
        "--max-problems",
        type=int,
        default=100,
        help="print at most this many problems per data set (all are counted)",
    )
    args = parser.parse_args(argv)
    return run_tool(lambda: _run(args), PROG)
