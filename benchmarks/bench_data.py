"""Throughput of ``process_hf_dataset`` (map fn + template + tokenise + pack) on synthetic data.

Synthesises short Alpaca records, then times the whole processing with ``alpaca_map_fn``, the
``default`` prompt template and the demo tokenizer, each configuration in a fresh process:

    python benchmarks/bench_data.py                    # 100k records, map_num_proc 1 and all CPUs
    python benchmarks/bench_data.py --records 20000 --baseline

Rows: ``map_num_proc=N`` with the tokenizer's own threads off (pure process scaling), the
default single process (the Rust tokenizer may use every core itself), a restart that finds
the processed data in the cache, and with ``--baseline`` the XTuner 0.x style pipeline (one
``datasets.map`` per step, one record per call) for reference. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import platform
import random
import subprocess
import sys
import tempfile
import time

WORDS = [
    *("the", "a", "word", "letters", "reverse", "count", "market", "rocket", "dragon"),
    *("planet", "answer", "question", "how", "many", "does", "have", "which", "first"),
    *("last", "vowel", "sort", "list", "number", "sum", "name", "city", "river", "mountain"),
]


def synthesise(path: str, records: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(records):
            record = {
                "instruction": " ".join(rng.choices(WORDS, k=rng.randint(4, 10))).capitalize()
                + "?",
                "input": rng.choice(["", " ".join(rng.choices(WORDS, k=rng.randint(1, 3)))]),
                "output": " ".join(rng.choices(WORDS, k=rng.randint(1, 12))),
            }
            f.write(json.dumps(record) + "\n")


def _pipeline_kwargs(tokenizer, max_length: int) -> dict:
    from xtuner.dataset.map_fns import alpaca_map_fn, template_map_fn_factory
    from xtuner.utils import PROMPT_TEMPLATE

    return dict(
        tokenizer=tokenizer,
        max_length=max_length,
        dataset_map_fn=alpaca_map_fn,
        template_map_fn=template_map_fn_factory(PROMPT_TEMPLATE.default),
    )


def _baseline(dataset, tokenizer, max_length: int):
    """XTuner 0.x order of work: one per-record ``datasets.map`` per step, then packing."""
    from functools import partial

    from datasets import Dataset

    from xtuner.dataset.utils import encode_fn, pack_table

    kwargs = _pipeline_kwargs(tokenizer, max_length)
    dataset = dataset.map(kwargs["dataset_map_fn"], keep_in_memory=True)
    dataset = dataset.map(kwargs["template_map_fn"], keep_in_memory=True)
    dataset = dataset.filter(lambda r: len(r["conversation"]) > 0, keep_in_memory=True)
    dataset = dataset.map(
        partial(encode_fn, tokenizer=tokenizer, max_length=max_length),
        remove_columns=dataset.column_names,
        keep_in_memory=True,
    )
    dataset = dataset.filter(lambda r: any(t >= 0 for t in r["labels"]), keep_in_memory=True)
    return Dataset(pack_table(dataset.data.table, max_length))


def run_one(args) -> dict:
    """One configuration in this process; returns its timings."""
    import datasets
    from datasets import load_dataset
    from transformers import AutoTokenizer

    from xtuner.dataset import process_hf_dataset

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    dataset = load_dataset("json", data_files=args.data, split="train")
    start = time.perf_counter()
    if args.mode == "baseline":
        out = _baseline(dataset, tokenizer, args.max_length)
    else:
        out = process_hf_dataset(
            dataset, map_num_proc=args.procs, **_pipeline_kwargs(tokenizer, args.max_length)
        )
    seconds = time.perf_counter() - start
    lengths = out["length"][:]
    return {"seconds": seconds, "rows": len(out), "tokens": int(sum(lengths))}


def _spawn(args, mode: str, procs: int, env: dict) -> dict:
    cmd = [
        sys.executable,
        osp.abspath(__file__),
        "--run-one",
        "--mode",
        mode,
        "--procs",
        str(procs),
        "--data",
        args.data,
        "--tokenizer",
        args.tokenizer,
        "--max-length",
        str(args.max_length),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--procs", type=int, nargs="+", default=None, help="map_num_proc values")
    parser.add_argument("--baseline", action="store_true", help="also time the 0.x pipeline")
    parser.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ours", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        args.procs = args.procs[0]
        print(json.dumps(run_one(args)))
        return 0

    import datasets
    import tokenizers
    import torch
    import transformers

    from xtuner.dataset.huggingface import available_cpus
    from xtuner.demo import build_tiny_tokenizer

    cpus = available_cpus()
    procs = args.procs or sorted({1, cpus})
    work = tempfile.mkdtemp(prefix="xtuner_bench_data_")
    args.data = osp.join(work, "alpaca.jsonl")
    args.tokenizer = osp.join(work, "tokenizer")
    synthesise(args.data, args.records)
    build_tiny_tokenizer(args.tokenizer)
    base = dict(os.environ, XTUNER_DATASET_CACHE="none", OMP_NUM_THREADS="1")
    quiet = dict(base, TOKENIZERS_PARALLELISM="false")
    runs = [(f"map_num_proc={n}, tokenizer threads off", "ours", n, quiet) for n in procs]
    runs.append(("map_num_proc=1, tokenizer threads on (default)", "ours", 1, base))
    cached = dict(base, XTUNER_DATASET_CACHE=osp.join(work, "cache"))
    runs.append(("first run, result saved to the cache", "ours", max(procs), cached))
    runs.append(("restart: loaded from the cache", "ours", max(procs), cached))
    if args.baseline:
        runs.append(("XTuner 0.x style (per-record maps), threads on", "baseline", 1, base))

    print(f"{args.records} records, max_length {args.max_length}, {cpus} CPUs available")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, datasets {datasets.__version__}, "
        f"tokenizers {tokenizers.__version__}\n"
    )
    print("| configuration | seconds | records/s | tokens/s | packed rows |")
    print("|---|---:|---:|---:|---:|")
    for name, mode, n, env in runs:
        result = _spawn(args, mode, n, env)
        seconds, rows = result["seconds"], result["rows"]
        rate, tokens = args.records / seconds, result["tokens"] / seconds
        print(f"| {name} | {seconds:.2f} | {rate:,.0f} | {tokens:,.0f} | {rows} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
