"""DPO forward+backward benchmark: peak extra memory and time, chunked vs full logits.

One preference pair of ``--tokens`` target tokens in all (chosen and rejected answers of
``tokens / 2`` each): the policy's final hidden states ``[N, D]`` and head ``[V, D]`` (both
requiring grad) and the reference's hidden states and head (frozen). Each method computes
the reference log-probabilities (no grad), the policy's, the DPO sigmoid loss, and its
gradients w.r.t. the policy's hidden states and head, in a fresh subprocess:

* ``full``: the XTuner 0.x / TRL path: full logits ``hidden @ W.T`` for the policy and the
  reference, float32 ``log_softmax``, gather, sums; autograd backward.
* ``chunked``: :class:`~xtuner.model.losses.preference.DPOLoss` on a
  :class:`~xtuner.model.losses.LossContext`, and the reference through
  :func:`~xtuner.model.losses.chunked_target_logps` as :class:`~xtuner.model.dpo.DPO`
  computes it: ``chunk_size`` rows of logits at a time, recomputed in backward.

Memory is measured as in ``bench_loss.py``: peak RSS (``VmHWM``, reset before the run) minus
the RSS with the inputs allocated; on ``--device cuda`` ``torch.cuda.max_memory_allocated()``
above the allocation before the run. The head's gradient (``V x D`` elements) is part of it:
the floor any method must pay; the table shows the extra memory above that floor.

Usage::

    # CPU-feasible point (a minute on 2 cores)
    python benchmarks/bench_dpo.py --tokens 1024 --vocab 32768 --hidden 1024
    # the acceptance point (4096 tokens per pair x 128k vocabulary; 16 GiB for `full`)
    python benchmarks/bench_dpo.py --tokens 4096 --vocab 131072 --hidden 2048 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from bench_loss import GIB, measure_forward_backward  # noqa: E402

METHODS = ("full", "chunked")
BETA = 0.1


def make_inputs(tokens: int, vocab: int, hidden: int, dtype, device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    ref_h = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    ref_w = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device, dtype)
    y = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    return h, w, ref_h, ref_w, y


def build_method(name: str, h, w, ref_h, ref_w, y, chunk_size: int):
    from xtuner.model.losses import (
        LossContext,
        build_loss,
        chunked_target_logps,
        compute_weights,
        finalize_loss,
    )

    half = h.shape[0] // 2
    seq = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    seq[half:] = 1
    # Two answers in one packed row; the first position of each answer has no target.
    valid = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    valid[0] = valid[half] = False

    def sums(logps):
        logps = logps * valid
        return torch.zeros(2, dtype=logps.dtype, device=logps.device).index_add(0, seq, logps)

    if name == "full":

        def full_logps(hidden, weight):
            logp = torch.log_softmax((hidden @ weight.t()).float(), -1)
            return logp.gather(1, y[:, None]).squeeze(1)

        def run():
            with torch.no_grad():
                ref = sums(full_logps(ref_h, ref_w))
            pol = sums(full_logps(h, w))
            return -F.logsigmoid(BETA * ((pol[0] - pol[1]) - (ref[0] - ref[1])))

        return run

    loss = build_loss(dict(type="DPOLoss", beta=BETA, chunk_size=chunk_size))
    labels = torch.where(valid, y, torch.full_like(y, -100))[None]

    def run():
        with torch.no_grad():
            ref = sums(chunked_target_logps(ref_h, ref_w, None, y, chunk_size))
        weights = compute_weights(loss.weight_specs(), labels)
        batch = {"labels": labels, "ref_logps": ref}
        extras = loss.extra_inputs(batch, labels)
        ctx = LossContext(h[None], w, None, labels, weights, extras, batch)
        return finalize_loss(loss(ctx), weights)["loss"]

    return run


def worker(args) -> dict:
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[args.dtype])
    cuda = args.device == "cuda"
    h, w, ref_h, ref_w, y = make_inputs(args.tokens, args.vocab, args.hidden, dtype, args.device)
    fn = build_method(args.worker, h, w, ref_h, ref_w, y, args.chunk_size)
    loss, wall, _, extra = measure_forward_backward(fn, h, w, cuda)
    mine = {"loss": loss.detach().cpu(), "grad_h": h.grad.cpu(), "grad_w": w.grad.cpu()}
    path = osp.join(args.ref_dir, "full.pt")
    result = {"wall_s": wall, "extra_gib": extra / GIB, "loss": float(loss)}
    if args.worker == "full":
        torch.save(mine, path)
    elif osp.exists(path):
        ref = torch.load(path)
        result["max_rel_err"] = max(
            float((mine[k].float() - ref[k].float()).abs().max() / ref[k].float().abs().max())
            for k in mine
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="target tokens of the pair")
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", help="append the Markdown table to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--ref-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as ref_dir:
        for method in sorted(args.methods, key=METHODS.index):  # the reference first
            cmd = [sys.executable, __file__, "--worker", method, "--ref-dir", ref_dir]
            for flag in ("tokens", "vocab", "hidden", "dtype", "device", "chunk_size"):
                cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
            rows.append((method, json.loads(proc.stdout.strip().splitlines()[-1])))
    elem = 2 if args.dtype == "bf16" else 4
    floor = args.vocab * args.hidden * elem / GIB
    lines = [
        f"DPO sigmoid, {args.tokens} tokens per pair x vocab {args.vocab} x hidden {args.hidden}, "
        f"{args.dtype}, {args.device}, chunk_size {args.chunk_size}; grad-W floor "
        f"{floor:.3f} GiB; load avg {os.getloadavg()[0]:.1f}",
        "",
        "| method | wall s | extra peak GiB | over grad-W floor GiB | max rel err vs full |",
        "|---|---|---|---|---|",
    ]
    for method, r in rows:
        err = f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "-"
        lines.append(
            f"| {method} | {r['wall_s']:.2f} | {r['extra_gib']:.3f} | "
            f"{r['extra_gib'] - floor:.3f} | {err} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(f"\n`python benchmarks/bench_dpo.py {' '.join(sys.argv[1:])}`\n\n{text}\n")


if __name__ == "__main__":
    main()
