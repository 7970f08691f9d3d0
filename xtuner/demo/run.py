"""``make demo`` / ``python -m xtuner.demo.run``: train the bundled demo and show the result.

Runs ``xtuner train demo_tiny_llama_full_alpaca`` (a tiny Llama-style model, built offline,
learning four small tasks on a CPU), then reports the loss at the start and the end, the
model's answers before and after training, and loads the saved HF-format model back with
``AutoModelForCausalLM.from_pretrained`` to answer once more.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import os.path as osp
import subprocess
import sys
import time

CONFIG = "demo_tiny_llama_full_alpaca"


def _latest_run(work_dir: str) -> str:
    runs = sorted(d for d in glob.glob(osp.join(work_dir, "2*")) if osp.isdir(d))
    if not runs:
        raise FileNotFoundError(f"no run folder under {work_dir}")
    return runs[-1]


def read_losses(run_dir: str) -> list[tuple[int, float]]:
    """(iteration, loss) pairs from mmengine's ``vis_data/scalars.json``."""
    losses = []
    with open(osp.join(run_dir, "vis_data", "scalars.json"), encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record and "step" in record:
                losses.append((int(record["step"]), float(record["loss"])))
    return losses


def read_chats(run_dir: str) -> dict[str, list[str]]:
    """Chat lines the EvaluateChatHook logged, by moment ('before training', ...)."""
    logs = glob.glob(osp.join(run_dir, "*.log"))
    chats: dict[str, list[str]] = {}
    if not logs:
        return chats
    with open(logs[0], encoding="utf-8") as f:
        for line in f:
            if "[chat " in line:
                moment, _, text = line.split("[chat ", 1)[1].partition("] ")
                chats.setdefault(moment, []).append(text.strip())
    return chats


def answer_with_saved_model(hf_dir: str, prompt: str, stop_words: list[str]) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    vocab = tokenizer.get_vocab()
    # Stop at the template's end-of-turn token, as the chat hook does during training.
    stops = [vocab[word] for word in stop_words if word in vocab]
    if tokenizer.eos_token_id is not None:
        stops.append(tokenizer.eos_token_id)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=stops)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xtuner.demo.run", description=__doc__)
    parser.add_argument("--work-dir", default="work_dirs/demo")
    parser.add_argument("--cfg-options", nargs="+", default=[])
    args = parser.parse_args(argv)

    print(f"== xtuner demo: training {CONFIG} on the CPU (logs every 10 iterations) ==")
    start = time.time()
    cmd = [sys.executable, "-m", "xtuner.entry_point", "train", CONFIG, "--work-dir", args.work_dir]
    if args.cfg_options:
        cmd += ["--cfg-options", *args.cfg_options]
    status = subprocess.call(cmd)
    if status != 0:
        print(f"demo: training failed (exit status {status}); see the log above", file=sys.stderr)
        return status
    minutes = (time.time() - start) / 60
    run_dir = _latest_run(args.work_dir)
    losses = read_losses(run_dir)
    chats = read_chats(run_dir)

    print(f"\n== result (trained in {minutes:.1f} min) ==")
    if losses:
        (first_it, first), (last_it, last) = losses[0], losses[-1]
        print(f"loss: {first:.3f} at iteration {first_it} -> {last:.3f} at iteration {last_it}")
    for moment in ("before training", "after training"):
        for line in chats.get(moment, []):
            print(f"chat {moment}: {line}")
    hf_dir = osp.join(args.work_dir, "hf_model")
    if osp.isdir(hf_dir):
        from xtuner.utils import PROMPT_TEMPLATE

        template = PROMPT_TEMPLATE.qwen_chat
        prompt = template.INSTRUCTION.format(input="Write the word in capitals.\ngarden", round=1)
        answer = answer_with_saved_model(hf_dir, prompt, template.STOP_WORDS)
        print(f"saved HF model ({hf_dir}) loaded with from_pretrained; it answers: {answer!r}")
    print(f"logs and checkpoints: {os.path.abspath(run_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
