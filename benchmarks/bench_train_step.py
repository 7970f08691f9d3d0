"""Training-step benchmark: SupervisedFinetune's pluggable loss vs the HF model's own loss.

One step = forward + backward + ``AdamW.step()`` on one random batch. Both paths share one
model and one optimizer and run interleaved (the order alternates every round), so drift in
machine load hits both alike; the first ``--warmup`` rounds are not counted. Reported: the
median wall time and the median process CPU time per step, and their ratio (ours / HF).

* ``ours``: ``SupervisedFinetune.compute_loss`` (backbone hidden states, then the default
  loss, :class:`~xtuner.model.losses.CrossEntropyLoss`, chunked).
* ``hf``: ``model.llm(input_ids=..., labels=...)``: full logits and HF's ``ForCausalLMLoss``.

Models (random weights, built from :func:`xtuner.demo.tiny_llama_config`):

* ``demo``: the demo config's model (hidden 128, 4 layers, vocab 1024).
* ``100m``: a Llama-style model of about 100M parameters (hidden 768, 12 layers, 12 heads,
  intermediate 1536, vocab 32000, untied head).

Usage::

    python benchmarks/bench_train_step.py --models demo 100m \
        --out benchmarks/results/train_step_cpu.md
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import platform
import statistics
import sys
import time

import torch

MODELS = {
    "demo": dict(vocab=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4),
    "100m": dict(
        vocab=32000,
        hidden_size=768,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
    ),
}


def build(name: str):
    """The SupervisedFinetune model (default loss) and its optimizer."""
    from transformers import LlamaForCausalLM

    from xtuner.demo import tiny_llama_config
    from xtuner.model import SupervisedFinetune

    spec = dict(MODELS[name])
    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config(spec.pop("vocab"), **spec))
    model = SupervisedFinetune(llm=llm, use_activation_checkpointing=False).train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-5)


def make_batch(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """Random tokens; the first quarter of every row is a prompt (label -100)."""
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, vocab, (batch, seq), generator=gen)
    labels = input_ids.clone()
    labels[:, : seq // 4] = -100
    return {"input_ids": input_ids, "labels": labels}


def step(model, optimizer, data: dict[str, torch.Tensor], path: str) -> tuple[float, float]:
    """One training step; returns (wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    if path == "ours":
        losses = model.compute_loss(data)
        loss = sum(v for k, v in losses.items() if "loss" in k)
    else:
        loss = model.llm(input_ids=data["input_ids"], labels=data["labels"]).loss
    loss.backward()
    optimizer.step()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench(name: str, batch: int, seq: int, runs: int, warmup: int) -> dict:
    """Interleaved steps of both paths; medians and the loss of each path on the batch."""
    model, optimizer = build(name)
    data = make_batch(model.llm.config.vocab_size, batch, seq)
    with torch.no_grad():
        ours_loss = float(model.compute_loss(data)["loss"])
        hf_loss = float(model.llm(**data).loss)
    times: dict[str, list[tuple[float, float]]] = {"ours": [], "hf": []}
    loads = []
    for i in range(warmup + runs):
        order = ("ours", "hf") if i % 2 == 0 else ("hf", "ours")
        for path in order:
            result = step(model, optimizer, data, path)
            if i >= warmup:
                times[path].append(result)
        loads.append(os.getloadavg()[0])
    med = {
        path: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
        for path, ts in times.items()
    }
    return {
        "model": name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": batch,
        "seq": seq,
        "runs": runs,
        "ours": med["ours"],
        "hf": med["hf"],
        "spread": {p: (min(t[0] for t in ts), max(t[0] for t in ts)) for p, ts in times.items()},
        "loss_diff": abs(ours_loss - hf_loss),
        "load": (min(loads), max(loads)),
    }


def markdown(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| model | params | batch x seq | runs | ours wall s (min-max) | HF wall s (min-max) "
        "| wall ours/HF | ours CPU s | HF CPU s | CPU ours/HF | |loss ours - HF| | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        (ow, oc), (hw, hc) = r["ours"], r["hf"]
        so, sh = r["spread"]["ours"], r["spread"]["hf"]
        lines.append(
            f"| {r['model']} | {r['params_m']:.1f}M | {r['batch']} x {r['seq']} | {r['runs']} "
            f"| {ow:.3f} ({so[0]:.3f}-{so[1]:.3f}) | {hw:.3f} ({sh[0]:.3f}-{sh[1]:.3f}) "
            f"| {ow / hw:.3f} | {oc:.3f} | {hc:.3f} | {oc / hc:.3f} | {r['loss_diff']:.1e} "
            f"| {r['load'][0]:.1f}-{r['load'][1]:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, nargs="+", default=[512, 1024], help="one per model")
    parser.add_argument("--runs", type=int, nargs="+", default=[20, 5], help="one per model")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = parser.parse_args()
    if not len(args.models) == len(args.seq) == len(args.runs):
        parser.error("give one --seq and one --runs value per model")
    import transformers

    rows = [
        bench(name, args.batch, seq, runs, args.warmup)
        for name, seq, runs in zip(args.models, args.seq, args.runs)
    ]
    env = (
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}"
    )
    cmd = "python benchmarks/bench_train_step.py " + " ".join(sys.argv[1:])
    text = f"`{cmd}`\n\n{env}\n\n{markdown(rows)}"
    print(text)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
