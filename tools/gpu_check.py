"""The checks that need one CUDA GPU, in a few minutes; prints one Markdown table.

``make gpu-check`` (or ``python tools/gpu_check.py [--out FILE]``) on a machine with a CUDA
GPU runs, with whatever wheels are installed:

1. ``demo-bf16``: the demo config trained with bf16 AMP (the loss must fall);
2. ``qlora``: tiny Llama in 4-bit (bitsandbytes' CUDA kernels) + LoRA: steps on the GPU, the
   adapters move, the 4-bit base does not;
3. ``zero2``/``zero3``: the demo config with ``--deepspeed deepspeed_zero2/3`` on one GPU
   (bf16), its HF export loads;
4. ``flash-attn``: two packed rows (position ids restarting at 0, ``use_varlen_attn=True``)
   on flash-attention 2 equal each document run alone: per-document loss, then the loss and
   every gradient of SupervisedFinetune; ``flex-attn``: the same on flex-attention (torch's
   FlexAttention, compiled; the model built on the GPU, so the build-time probes run on
   flex too); ``autocast-bf16``: under ``torch.autocast`` (bf16)
   with float32 master weights, the head's GEMMs run in bf16 (recorded with a dispatch mode)
   and the loss stays within 2e-2 of the float32 loss;
5. ``liger``/``cce``: ``CrossEntropyLoss(backend='liger'|'cce')`` against the chunked loss on
   the same model and batch: loss value and every gradient;
6. ``bench-loss``: the benchmark's GPU point (8192 tokens x 151936 vocabulary x 2048 hidden,
   bf16) for the CE methods; ``bench-packed``: one training step on packed rows of 4096 and
   16384 tokens with sdpa's dense document mask, flex-attention and flash-attention varlen
   (``benchmarks/bench_packed_attention.py``).

A check whose package is missing is ``skipped`` with the package named. Without CUDA
nothing runs: the script says so and exits 0 (CI never depends on it). Paste the table into
docs/en/performance.md ("GPU check").
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


@dataclass
class Result:
    name: str
    status: str  # 'ok', 'FAIL' or 'skipped'
    detail: str
    seconds: float = 0.0


class Skip(Exception):
    """A check that cannot run here (a missing package); the message says which."""


def _need(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Skip(f"needs {package} (pip install {package})")


def _xtuner(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "xtuner.entry_point", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _losses(work_dir: str) -> list[float]:
    runs = sorted(glob.glob(osp.join(work_dir, "2*", "vis_data", "scalars.json")))
    with open(runs[-1], encoding="utf-8") as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _train_demo(tmp: str, name: str, *extra: str) -> str:
    work = osp.join(tmp, name)
    options = ["optim_wrapper.dtype=bfloat16", "train_cfg.max_epochs=2"]
    out = _xtuner("train", "demo_tiny_llama_full_alpaca", "--work-dir", work, "--seed", "0",
                  *extra, "--cfg-options", *options)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    losses = _losses(work)
    if not losses[-1] < 0.8 * losses[0]:
        raise RuntimeError(f"the loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}")
    return f"{len(losses)} iters, loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def check_demo_bf16(tmp: str) -> str:
    return _train_demo(tmp, "demo_bf16")


def _check_zero(tmp: str, stage: int) -> str:
    _need("deepspeed", "deepspeed")
    text = _train_demo(tmp, f"zero{stage}", "--deepspeed", f"deepspeed_zero{stage}")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(osp.join(tmp, f"zero{stage}", "hf_model"))
    return text + ", HF export loads"


def check_zero2(tmp: str) -> str:
    return _check_zero(tmp, 2)


def check_zero3(tmp: str) -> str:
    return _check_zero(tmp, 3)


def _tiny_model_path(tmp: str) -> str:
    from xtuner.demo import prepare_demo

    return prepare_demo(osp.join(tmp, "assets"))["model"]


def check_qlora(tmp: str) -> str:
    _need("bitsandbytes", "bitsandbytes")
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from xtuner.model import SupervisedFinetune

    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    llm = dict(
        type=AutoModelForCausalLM.from_pretrained,
        pretrained_model_name_or_path=_tiny_model_path(tmp),
        quantization_config=quant,
        device_map={"": 0},
    )
    model = SupervisedFinetune(llm=llm, lora=LoraConfig(r=8, lora_alpha=16))
    model.cuda()
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = [p.detach().clone() for p in trainable]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    ids = torch.randint(10, 500, (2, 64), device="cuda")
    losses = []
    for _ in range(5):
        loss = model({"input_ids": ids, "labels": ids})["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    moved = sum(not torch.equal(b, p) for b, p in zip(before, trainable))
    if not moved or not all(torch.isfinite(torch.tensor(losses))):
        raise RuntimeError(f"adapters moved: {moved}, losses {losses}")
    for name, p in model.named_parameters():
        if not p.requires_grad and not torch.equal(frozen[name], p):
            raise RuntimeError(f"the frozen weight {name} changed")
    return f"4-bit base, {moved} adapter tensors trained, loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def packed_equals_separate(path: str, device: str, attn: str, dtype_name: str) -> float:
    """Two packed rows (five documents, ``use_varlen_attn=True``) against each document run
    alone: the per-document loss from the model's own logits, then SupervisedFinetune's
    loss and every gradient. Returns the largest relative difference (to each tensor's
    largest entry). ``attn='sdpa'`` on the CPU is what the tests run; the GPU check runs
    flash-attention 2, whose packed path needs the document boundaries of every row, and
    flex-attention (a BlockMask from the position ids; no backward on the CPU)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from xtuner.model import SupervisedFinetune

    dtype = getattr(torch, dtype_name)
    llm = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype)
    model = SupervisedFinetune(
        llm.to(device), use_activation_checkpointing=False, use_varlen_attn=True
    )
    g = torch.Generator().manual_seed(0)
    rows = [[torch.randint(10, 500, (n,), generator=g).to(device) for n in lengths]
            for lengths in ((37, 64, 27), (50, 78))]  # fmt: skip
    ids = torch.stack([torch.cat(row) for row in rows])
    positions = torch.stack(
        [torch.cat([torch.arange(len(d), device=device) for d in row]) for row in rows]
    )
    worst = 0.0

    def compare(got, want) -> None:
        nonlocal worst
        worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-12)))

    with torch.no_grad():
        logits = model.llm(input_ids=ids, position_ids=positions).logits.float()
        for r, row in enumerate(rows):
            start = 0
            for doc in row:
                alone = model.llm(input_ids=doc[None]).logits[0, :-1].float()
                got = logits[r, start : start + len(doc) - 1]
                compare(F.cross_entropy(got, doc[1:]), F.cross_entropy(alone, doc[1:]))
                start += len(doc)
    loss = model({"input_ids": ids, "labels": ids.clone(), "position_ids": positions})["loss"]
    loss.backward()
    packed = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # The token mean over every document, each document run alone.
    docs = [doc for row in rows for doc in row]
    count = sum(len(d) - 1 for d in docs)
    ref = sum(model({"input_ids": d[None], "labels": d[None]})["loss"] * (len(d) - 1) for d in docs)
    (ref / count).backward()
    compare(loss.detach().float(), (ref / count).detach().float())
    for name, p in model.named_parameters():
        compare(packed[name], p.grad.float())
    return worst


def _check_packed(tmp: str, attn: str) -> str:
    err = packed_equals_separate(_tiny_model_path(tmp), "cuda", attn, "bfloat16")
    if err > 3e-2:
        raise RuntimeError(f"packed and separate documents differ: relative error {err:.2e}")
    return (
        f"batch 2, 5 documents packed = separate: loss and every gradient within {err:.1e} (bf16)"
    )


def check_flash_attn(tmp: str) -> str:
    _need("flash_attn", "flash-attn")
    return _check_packed(tmp, "flash_attention_2")


def check_flex_attn(tmp: str) -> str:
    _need("torch.nn.attention.flex_attention", "torch>=2.5")
    return _check_packed(tmp, "flex_attention")


def autocast_head_gemms(path: str, device: str) -> tuple[set, float]:
    """SupervisedFinetune with float32 master weights under ``torch.autocast(bf16)``: the
    dtypes of the matrix products that involve the vocabulary (the head's GEMMs, recorded
    with a dispatch mode) and the loss's relative difference from the float32 loss."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    from xtuner.model import SupervisedFinetune

    llm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model = SupervisedFinetune(llm, use_activation_checkpointing=False)
    vocab = llm.get_output_embeddings().weight.shape[0]
    gemms = {torch.ops.aten.mm.default, torch.ops.aten.mm.out, torch.ops.aten.addmm.default,
             torch.ops.aten.addmm.out, torch.ops.aten.addmm_.default}  # fmt: skip
    seen: set = set()

    class RecordHeadGemms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if func in gemms and any(vocab in t.shape for t in tensors):
                seen.update(t.dtype for t in tensors)
            return func(*args, **(kwargs or {}))

    ids = torch.randint(10, 500, (2, 96), generator=torch.Generator().manual_seed(0)).to(device)
    data = {"input_ids": ids, "labels": ids.clone()}
    exact = model(data)["loss"].detach()
    with torch.autocast(device, dtype=torch.bfloat16), RecordHeadGemms():
        loss = model(data)["loss"]
        loss.backward()
    if not all(bool(p.grad.isfinite().all()) for p in model.parameters()):
        raise RuntimeError("a gradient under autocast is not finite")
    return seen, float((loss.detach() - exact).abs() / exact.abs())


def check_autocast_bf16(tmp: str) -> str:
    import torch

    dtypes, err = autocast_head_gemms(_tiny_model_path(tmp), "cuda")
    if dtypes != {torch.bfloat16} or err > 2e-2:
        raise RuntimeError(f"head GEMM dtypes {sorted(map(str, dtypes))}, loss error {err:.1e}")
    return f"the head's GEMMs run in bf16 (fp32 master weights); loss within {err:.1e} of fp32"


def _check_kernel(tmp: str, backend: str, module: str, package: str) -> str:
    _need(module, package)
    import torch
    from transformers import AutoModelForCausalLM

    from xtuner.model import SupervisedFinetune

    path = _tiny_model_path(tmp)
    ids = torch.randint(10, 500, (2, 96), device="cuda")
    results = []
    for choice in ("chunked", backend):
        torch.manual_seed(0)
        model = SupervisedFinetune(
            llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=path),
            loss=dict(type="CrossEntropyLoss", backend=choice),
            use_activation_checkpointing=False,
        ).cuda()
        loss = model({"input_ids": ids, "labels": ids})["loss"]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    worst = 0.0
    for name, grad in ref_grads.items():
        scale = float(grad.abs().max()) or 1.0
        worst = max(worst, float((grads[name] - grad).abs().max()) / scale)
    if worst > 1e-3:
        raise RuntimeError(f"gradients differ from the chunked loss: {worst:.1e} (relative)")
    return f"loss {float(loss):.5f} = chunked; gradients within {worst:.1e} (relative)"


def check_liger(tmp: str) -> str:
    return _check_kernel(tmp, "liger", "liger_kernel", "liger-kernel")


def check_cce(tmp: str) -> str:
    return _check_kernel(tmp, "cce", "cut_cross_entropy", "cut-cross-entropy")


def _benchmark(tmp: str, script: str, *args: str) -> str:
    """Runs ``benchmarks/<script> --out FILE args`` and returns its table."""
    out_file = osp.join(tmp, script.replace(".py", ".md"))
    cmd = [sys.executable, osp.join(ROOT, "benchmarks", script), *args, "--out", out_file]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    )
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    with open(out_file, encoding="utf-8") as f:
        table = f.read().strip()
    return "see below\n\n" + table


def check_bench_loss(tmp: str) -> str:
    return _benchmark(tmp, "bench_loss.py", "--device", "cuda", "--tokens", "8192",
                      "--vocab", "151936", "--hidden", "2048", "--dtype", "bf16",
                      "--methods", "hf", "ce_chunked", "ce_liger", "ce_cce")  # fmt: skip


def check_bench_packed(tmp: str) -> str:
    return _benchmark(tmp, "bench_packed_attention.py", "--tokens", "4096", "16384")


CHECKS: dict[str, Callable[[str], str]] = {
    "demo-bf16": check_demo_bf16,
    "qlora": check_qlora,
    "zero2": check_zero2,
    "zero3": check_zero3,
    "flash-attn": check_flash_attn,
    "flex-attn": check_flex_attn,
    "autocast-bf16": check_autocast_bf16,
    "liger": check_liger,
    "cce": check_cce,
    "bench-loss": check_bench_loss,
    "bench-packed": check_bench_packed,
}


def run_checks(names: list[str], tmp: str) -> list[Result]:
    results = []
    for name in names:
        start = time.perf_counter()
        try:
            detail, status = CHECKS[name](tmp), "ok"
        except Skip as exc:
            detail, status = str(exc), "skipped"
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            detail, status = f"{type(exc).__name__}: {exc}".splitlines()[0], "FAIL"
        results.append(Result(name, status, detail, time.perf_counter() - start))
    return results


def summary(results: list[Result], device: str) -> str:
    """The Markdown table of the results (long details, such as a benchmark table, after it)."""
    lines = [f"GPU check on {device}", "", "| check | result | detail | s |", "|---|---|---|---|"]
    tails = []
    for r in results:
        first, _, rest = r.detail.partition("\n")
        lines.append(f"| {r.name} | {r.status} | {first} | {r.seconds:.0f} |")
        if rest.strip():
            tails.append(f"{r.name}:\n{rest.strip()}")
    return "\n".join(lines + [""] + tails).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here: nothing to check (run it on a machine with a GPU)")
        return 0
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    with tempfile.TemporaryDirectory(prefix="xtuner_gpu_check_") as tmp:
        results = run_checks(args.checks, tmp)
    text = summary(results, device)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
