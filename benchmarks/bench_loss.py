"""Loss forward+backward benchmark: peak extra memory, time and agreement with a reference.

Every method runs in a fresh subprocess on the same seeded inputs (hidden states ``[N, D]``
and a head weight ``[V, D]``, both requiring grad, all ``N`` targets valid) and computes the
mean loss over tokens and its gradients w.r.t. the hidden states and the head weight.

Methods:

* ``hf``: the HF path (``ForCausalLMLoss``): full logits ``hidden @ W.T``, upcast to
  float32, ``F.cross_entropy``; autograd backward. The reference of the CE methods.
* ``ce_full``/``ce_chunked``: :class:`~xtuner.model.losses.CrossEntropyLoss` with
  ``chunk_size=0`` (all logits at once) and the default ``chunk_size``.
* ``torch_lce``: ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``
  (skipped with a note when this torch lacks it).
* ``focal``/``dft``: :class:`FocalLoss` (gamma 2) and :class:`DFTLoss`, chunked;
  ``focal_ref``/``dft_ref`` are the same losses written on full logits with autograd (their
  references).
* ``kd``: :class:`KDLoss` (forward KL, T=1) given the teacher's hidden states and head;
  ``kd_ref`` is the same on full student and teacher logits with autograd (its reference:
  both do 4 matmuls of ``N x V x D``).
* ``ce_liger``/``ce_cce``: ``CrossEntropyLoss(backend='liger'|'cce')``, the fused kernels
  of Liger Kernel and Cut Cross-Entropy (``--device cuda`` with the package installed;
  skipped with a note otherwise).

``--device cuda``: inputs are made on the CPU with the same seed and moved; each method runs
once untimed first (Triton compilation and autotuning, cuBLAS workspaces), then once timed
between ``torch.cuda.synchronize()`` calls; memory is ``torch.cuda.max_memory_allocated()``
above what was allocated before the timed run. On the CPU the single run is cold, as in the
published tables.

Memory: the worker allocates its inputs, reads ``VmRSS``, resets the kernel's peak-RSS
counter (``echo 5 > /proc/self/clear_refs`` sets ``VmHWM`` to the current RSS), runs forward
and backward, and reads ``VmHWM``. Peak extra memory = ``VmHWM - VmRSS`` before the run: every
byte the loss touched at its peak (logits, temporaries, the gradients themselves), as the
kernel counts it, with no sampling gap. The gradients w.r.t. the head are part of it: their
size (``V x D`` elements) is the floor any method must pay.

Usage::

    python benchmarks/bench_loss.py --tokens 4096 --vocab 131072 --hidden 2048 --dtype fp32
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

METHODS = (
    "hf",
    "ce_full",
    "ce_chunked",
    "torch_lce",
    "focal_ref",
    "focal",
    "dft_ref",
    "dft",
    "kd_ref",
    "kd",
    "ce_liger",
    "ce_cce",
)
#: the method whose loss and gradients each method must reproduce.
REFERENCE = {
    "ce_full": "hf",
    "ce_chunked": "hf",
    "torch_lce": "hf",
    "focal": "focal_ref",
    "dft": "dft_ref",
    "kd": "kd_ref",
    "ce_liger": "hf",
    "ce_cce": "hf",
}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
GIB = 1 << 30


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make_inputs(
    tokens: int, vocab: int, hidden: int, dtype, teacher: bool, seed: int = 0, device="cpu"
):
    """Seeded inputs: hidden ``[N, D]``, head ``[V, D]`` (both with grad), targets ``[N]``."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=gen).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    t_h = t_w = None
    if teacher:
        t_h = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
        t_w = (torch.randn(vocab, hidden, generator=gen) * 0.02).to(device, dtype)
    return h, w, y, t_h, t_w


def _full_logits(h, w):
    return (h @ w.t()).float()


def build_method(name: str, h, w, y, t_h, t_w, chunk_size: int | None):
    """A closure returning the scalar mean loss (with grad); None when unavailable."""
    from xtuner.model import losses as L

    def ours(loss, extras=None):
        def run():
            labels = y[None]
            ctx = L.LossContext(
                hidden_states=h[None],
                head_weight=w,
                head_bias=None,
                labels=labels,
                weights=L.compute_weights(loss.weight_specs(), labels),
                extras=extras or {},
            )
            out = L.finalize_loss(loss(ctx), ctx.weights)
            return sum(v for k, v in out.items() if k.startswith("loss"))

        return run

    chunk = {} if chunk_size is None else {"chunk_size": chunk_size}
    if name == "hf":
        return lambda: F.cross_entropy(_full_logits(h, w), y, ignore_index=-100)
    if name == "ce_full":
        return ours(L.CrossEntropyLoss(chunk_size=0))
    if name == "ce_chunked":
        return ours(L.CrossEntropyLoss(**chunk))
    if name == "torch_lce":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(nn, "LinearCrossEntropyOptions"):
            return None
        opts = nn.LinearCrossEntropyOptions()
        return lambda: F.linear_cross_entropy(h, w, y, options=opts)
    if name in ("ce_liger", "ce_cce"):
        backend = name[3:]
        from xtuner.model.losses.backends import KERNELS, kernel

        if not h.is_cuda or kernel(backend) is None:
            return f"needs --device cuda and the package {KERNELS[backend][2]}"
        return ours(L.CrossEntropyLoss(backend=backend))
    if name == "focal":
        return ours(L.FocalLoss(gamma=2.0, **chunk))
    if name == "focal_ref":

        def focal_ref():
            log_pt = torch.log_softmax(_full_logits(h, w), -1).gather(1, y[:, None]).squeeze(1)
            return (-((1 - log_pt.exp()) ** 2) * log_pt).mean()

        return focal_ref
    if name == "dft":
        return ours(L.DFTLoss(**chunk))
    if name == "dft_ref":

        def dft_ref():
            log_pt = torch.log_softmax(_full_logits(h, w), -1).gather(1, y[:, None]).squeeze(1)
            return (-log_pt.exp().detach() * log_pt).mean()

        return dft_ref
    if name in ("kd", "kd_ref"):
        teacher = _Teacher(t_w)
        if name == "kd_ref":

            def kd_ref():
                log_p = torch.log_softmax(_full_logits(h, w), -1)
                with torch.no_grad():
                    log_q = torch.log_softmax(_full_logits(t_h, t_w), -1)
                return F.kl_div(log_p, log_q, log_target=True, reduction="sum") / h.shape[0]

            return kd_ref
        loss = L.KDLoss(teacher, divergence="forward_kl", **chunk)
        return ours(loss, {loss.teacher_key: t_h[None]})
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


class _Teacher(nn.Module):
    """Just enough of a causal LM for :class:`KDLoss`: an output head."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.head.weight = nn.Parameter(weight, requires_grad=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def _compare(ours, ref) -> dict:
    """Max |a - b| / max |b| per tensor, and ``allclose`` with rtol 1e-5 (atol 1e-5 x max|b|)."""
    out, ok = {}, True
    for key in ("loss", "grad_h", "grad_w"):
        a, b = ours[key].float(), ref[key].float()
        scale = b.abs().max().clamp_min(1e-30)
        out[f"err_{key}"] = float((a - b).abs().max() / scale)
        ok &= bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(scale)))
    out["allclose_1e-5"] = ok
    return out


def worker(args) -> dict:
    """Runs one method once; returns its measurements (printed as JSON by ``main``)."""

    dtype = getattr(torch, DTYPES[args.dtype])
    teacher = args.worker.startswith("kd")
    cuda = args.device == "cuda"
    h, w, y, t_h, t_w = make_inputs(
        args.tokens, args.vocab, args.hidden, dtype, teacher, device=args.device
    )
    fn = build_method(args.worker, h, w, y, t_h, t_w, args.chunk_size)
    if fn is None:
        return {"skipped": "torch.nn.functional.linear_cross_entropy is not in this torch"}
    if isinstance(fn, str):
        return {"skipped": fn}
    loss, wall, cpu, extra = measure_forward_backward(fn, h, w, cuda)
    result = {
        "wall_s": wall,
        "cpu_s": cpu,
        "extra_gib": extra / GIB,
        "loss": float(loss),
        "threads": torch.get_num_threads(),
        "load": os.getloadavg()[0],
    }
    mine = {"loss": loss.detach().cpu(), "grad_h": h.grad.cpu(), "grad_w": w.grad.cpu()}
    path = osp.join(args.ref_dir, f"{args.worker}.pt")
    if args.worker in REFERENCE.values():
        torch.save(mine, path)
    ref_name = REFERENCE.get(args.worker)
    if ref_name and osp.exists(osp.join(args.ref_dir, f"{ref_name}.pt")):
        ref = torch.load(osp.join(args.ref_dir, f"{ref_name}.pt"))
        result["vs"] = ref_name
        result.update(_compare(mine, ref))
    return result


def measure_forward_backward(fn, h, w, cuda: bool) -> tuple[torch.Tensor, float, float, int]:
    """Runs ``fn().backward()`` once and measures it.

    On CUDA a warm-up pass runs first (compilation, autotuning and workspaces are not what we
    measure). Returns ``(loss, wall seconds, CPU seconds, extra peak bytes)``: the peak above
    what was allocated before the pass (CUDA allocator, or the resident set on CPU).
    """
    if cuda:
        fn().backward()
        h.grad = w.grad = None
        torch.cuda.synchronize()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _status_kib("VmRSS") << 10
        _reset_peak()
    wall, cpu = time.perf_counter(), time.process_time()
    loss = fn()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated() if cuda else _status_kib("VmHWM") << 10
    return loss, wall, cpu, peak - base


def _run_worker(args, method: str, tokens: int, vocab: int, dtype: str, ref_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--ref-dir", ref_dir]
    cmd += ["--tokens", str(tokens), "--vocab", str(vocab), "--hidden", str(args.hidden[0])]
    cmd += ["--dtype", dtype, "--device", args.device]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        row = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:120]}
    else:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(method=method, tokens=tokens, vocab=vocab, hidden=args.hidden[0], dtype=dtype)
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def _merge(runs: list[dict]) -> dict:
    """One row from repeated runs of a method: median times, their range, the largest peak."""
    ok = [r for r in runs if "wall_s" in r]
    if not ok:
        return runs[0]
    row = dict(ok[0])
    for key in ("wall_s", "cpu_s"):
        row[key] = statistics.median(r[key] for r in ok)
    row["wall_range"] = (min(r["wall_s"] for r in ok), max(r["wall_s"] for r in ok))
    row["extra_gib"] = max(r["extra_gib"] for r in ok)
    row["load"] = statistics.mean(r["load"] for r in ok)
    row["runs"] = len(ok)
    return row


def run_point(args, tokens: int, vocab: int, dtype: str, ref_dir: str) -> list[dict]:
    """Every method at one grid point, each run in a fresh subprocess, references first.

    With ``--repeat N`` the methods run in N interleaved rounds (so a change of load during
    the benchmark falls on every method alike), and each row gives the median.
    """
    runs: dict[str, list[dict]] = {method: [] for method in args.methods}
    for _ in range(args.repeat):
        for method in args.methods:
            runs[method].append(_run_worker(args, method, tokens, vocab, dtype, ref_dir))
    return [_merge(runs[method]) for method in args.methods]


def markdown(rows: list[dict], chunk_size: int | None) -> str:
    """One table for all grid points; times relative to the HF path of the same point."""
    head = (
        "| tokens x vocab x hidden, dtype | method | wall s | CPU s | wall / HF | CPU / HF "
        "| extra peak GiB | over grad-W floor GiB | load avg | vs | max rel err loss / dH / dW "
        "| allclose 1e-5 | runs: wall range s |\n" + "|---" * 13 + "|\n"
    )
    lines = []
    hf = {}
    for r in rows:
        if r["method"] == "hf" and "wall_s" in r:
            hf[(r["tokens"], r["vocab"], r["dtype"])] = r
    for r in rows:
        point = f"{r['tokens']} x {r['vocab']} x {r['hidden']}, {r['dtype']}"
        if "wall_s" not in r:
            note = r.get("skipped") or f"failed: {r.get('error')}"
            lines.append(f"| {point} | {r['method']} | {note} |" + " |" * 11)
            continue
        base = hf.get((r["tokens"], r["vocab"], r["dtype"]))
        rel_w = f"{r['wall_s'] / base['wall_s']:.2f}" if base else "-"
        rel_c = f"{r['cpu_s'] / base['cpu_s']:.2f}" if base else "-"
        floor = r["vocab"] * r["hidden"] * (4 if r["dtype"] == "fp32" else 2) / GIB
        errs = (
            " / ".join(f"{r['err_' + k]:.1e}" for k in ("loss", "grad_h", "grad_w"))
            if "vs" in r
            else "-"
        )
        spread = "1"
        if r.get("runs", 1) > 1:
            spread = f"{r['runs']}: {r['wall_range'][0]:.1f}-{r['wall_range'][1]:.1f}"
        lines.append(
            f"| {point} | {r['method']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {rel_w} "
            f"| {rel_c} | {r['extra_gib']:.2f} | {r['extra_gib'] - floor:+.2f} | {r['load']:.1f} "
            f"| {r.get('vs', '-')} | {errs} | {r.get('allclose_1e-5', '-')} | {spread} |"
        )
    chunk = "default (1024)" if chunk_size is None else chunk_size
    return f"chunk_size: {chunk}\n\n" + head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--vocab", type=int, nargs="+", default=[131072])
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048])
    parser.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the loss's own")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of every method; rows give medians"
    )
    parser.add_argument("--out", default=None, help="append the Markdown table to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ref-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.tokens, args.vocab, args.hidden = args.tokens[0], args.vocab[0], args.hidden[0]
        args.dtype = args.dtype[0]
        print(json.dumps(worker(args)))
        return
    if len(args.hidden) != 1:
        parser.error("--hidden takes one value per run")
    # References first, so every method can be compared with its own.
    order = [m for m in METHODS if m in args.methods]
    refs = set(REFERENCE.values())
    args.methods = [m for m in order if m in refs] + [m for m in order if m not in refs]
    import transformers

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_loss_") as ref_dir:
        for dtype in args.dtype:
            for tokens in args.tokens:
                for vocab in args.vocab:
                    rows += run_point(args, tokens, vocab, dtype, ref_dir)
                    for name in os.listdir(ref_dir):
                        os.remove(osp.join(ref_dir, name))
    env = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}"
    )
    if args.device == "cuda":
        env += f", {torch.cuda.get_device_name()}"
    cmd = "python benchmarks/bench_loss.py " + " ".join(sys.argv[1:])
    text = f"`{cmd}`\n\n{env}\n\n{markdown(rows, args.chunk_size)}"
    print(text)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
