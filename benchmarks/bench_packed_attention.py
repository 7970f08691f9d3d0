"""Packed-documents benchmark: the attention backends on rows of packed documents (GPU).

One training step of ``SupervisedFinetune(use_varlen_attn=True)`` (forward + backward, the
default loss) on ``--batch`` rows of ``S`` tokens, each row packed with documents of random
lengths (``--doc-min`` to ``--doc-max`` tokens, the last one cut to fit), for each backend:

* ``sdpa``: transformers' dense boolean ``[B, 1, S, S]`` document mask (sdpa cannot use its
  flash kernel with a mask);
* ``flex``: ``attn_implementation='flex_attention'``, a ``BlockMask`` (compiled; the first,
  untimed step compiles);
* ``flash``: flash-attention 2 varlen with the rows' ``cu_seq_lens`` (when flash-attn is
  installed).

Reported per backend and length: the median step time of ``--runs`` steps after one untimed
step, and the peak CUDA memory of a step (``torch.cuda.max_memory_allocated``, the model and
its gradients included). A Llama-style model with random weights in bf16 (hidden 1024, 4
layers, 16 heads of 64, vocabulary 32000) keeps the attention a visible share of the step.
Without CUDA the script says so and exits 0 (``--device cpu --backends sdpa`` runs the code
path on the CPU, slowly: a smoke test, not a measurement).

Usage::

    python benchmarks/bench_packed_attention.py --tokens 4096 16384 \
        --out benchmarks/results/packed_attention_cuda.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import os.path as osp
import statistics
import sys
import time

import torch

#: backend name in the table -> transformers' attn_implementation.
BACKENDS = {"sdpa": "sdpa", "flex": "flex_attention", "flash": "flash_attention_2"}
VOCAB = 32000
#: overrides of xtuner.demo.tiny_llama_config: hidden 1024, 4 layers, 16 heads of 64.
MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4)
MODEL.update(num_attention_heads=16, num_key_value_heads=16)


def packed_rows(batch: int, length: int, doc_min: int, doc_max: int, device: str) -> dict:
    """``batch`` rows of ``length`` tokens, documents of random lengths packed in each."""
    g = torch.Generator().manual_seed(0)
    positions = []
    for _ in range(batch):
        row: list[torch.Tensor] = []
        filled = 0
        while filled < length:
            n = min(int(torch.randint(doc_min, doc_max + 1, (), generator=g)), length - filled)
            row.append(torch.arange(n))
            filled += n
        positions.append(torch.cat(row))
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    return {
        "input_ids": ids.to(device),
        "labels": ids.to(device),
        "position_ids": torch.stack(positions).to(device),
    }


def bench(backend: str, data: dict, runs: int, device: str) -> tuple[float, float]:
    """(median step seconds, peak GiB) of one backend on one batch."""
    from transformers import AutoModelForCausalLM

    from xtuner.demo import tiny_llama_config
    from xtuner.model import SupervisedFinetune

    config = tiny_llama_config(VOCAB, max_position_embeddings=data["input_ids"].shape[1], **MODEL)
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_config(
        config, attn_implementation=BACKENDS[backend], dtype=torch.bfloat16
    ).to(device)
    model = SupervisedFinetune(llm, use_activation_checkpointing=False, use_varlen_attn=True)
    times = []
    for i in range(runs + 1):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model(data, mode="loss")["loss"].backward()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:  # the first step compiles (flex) and warms up the kernels
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del model, llm
    if device == "cuda":
        torch.cuda.empty_cache()
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--doc-min", type=int, default=64)
    parser.add_argument("--doc-max", type=int, default=2048)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = parser.parse_args(argv)
    if args.device == "cpu" and "flex" in args.backends:
        parser.error("flex-attention has no backward on the CPU: --backends sdpa with --device cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_packed_attention: no CUDA device here (flex-attention trains on CUDA only)")
        return 0
    lines = ["| tokens per row | backend | step (s) | peak memory (GiB) |", "|---|---|---|---|"]
    for length in args.tokens:
        data = packed_rows(args.batch, length, args.doc_min, args.doc_max, args.device)
        for backend in args.backends:
            if backend == "flash" and importlib.util.find_spec("flash_attn") is None:
                lines.append(f"| {length} | flash | skipped: flash-attn not installed | |")
                continue
            try:
                seconds, peak = bench(backend, data, args.runs, args.device)
            except torch.cuda.OutOfMemoryError:
                lines.append(f"| {length} | {backend} | out of memory | |")
                torch.cuda.empty_cache()
                continue
            lines.append(f"| {length} | {backend} | {seconds:.3f} | {peak:.2f} |")
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    cmd = "python benchmarks/bench_packed_attention.py " + " ".join(sys.argv[1:])
    text = f"`{cmd}`\n\n{where}, torch {torch.__version__}, batch {args.batch}\n\n"
    text += "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
