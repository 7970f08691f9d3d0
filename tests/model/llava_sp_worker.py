"""Worker for the LLaVA sequence-parallel test (run by torchrun: 2 ranks, gloo, fp32).

``python -m torch.distributed.run --nproc_per_node 2 llava_sp_worker.py OUT``: for each loss,
the loss and every gradient of a tiny LLaVA model (all parts trainable) on a batch with one-,
two- and no-image samples, first with sp=1 (before sequence parallel is set up), then with
sp=2 (gradients averaged over the 2 ranks, as DDP does). Rank 0 saves them to OUT.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

VOCAB = 128
IMAGE = -200
IGNORE = -100


def build(loss):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    from xtuner.demo import tiny_llama_config
    from xtuner.demo.llava import tiny_clip_vision_config
    from xtuner.model import LLaVAModel

    torch.manual_seed(0)
    llm = LlamaForCausalLM(tiny_llama_config(VOCAB))
    llm.set_attn_implementation("sdpa")
    vision = CLIPVisionModel(tiny_clip_vision_config())
    return LLaVAModel(llm, vision, use_activation_checkpointing=False, loss=loss)


def batch() -> dict:
    g = torch.Generator().manual_seed(0)
    rows = [
        [1, 30, 31, 32, IMAGE, *range(40, 46), 2],
        [1, 50, IMAGE, 51, 52, IMAGE, *range(60, 66), 2],
        [1, *range(70, 79), 2],
    ]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = True
    labels = torch.where(mask & (ids != IMAGE), ids, IGNORE)
    labels[:, :2] = IGNORE
    pixel_values = [
        torch.randn(3, 32, 32, generator=g),
        torch.randn(2, 3, 32, 32, generator=g),
        torch.zeros(3, 32, 32),
    ]
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "pixel_values": pixel_values,
    }


LOSSES = {"ce": None, "focal_sample": dict(type="FocalLoss", gamma=2.0, reduction="sample")}


def loss_and_grads(loss) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = build(loss)
    out = model(batch(), mode="loss")
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"].detach(), grads


def main() -> None:
    from xtuner.parallel.sequence import init_sequence_parallel

    out = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    reference = {name: loss_and_grads(loss) for name, loss in LOSSES.items()}
    init_sequence_parallel(2)
    results = {}
    for name, loss in LOSSES.items():
        value, grads = loss_and_grads(loss)
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
        results[name] = {
            "ref_loss": reference[name][0],
            "ref_grads": reference[name][1],
            "sp_loss": value,
            "sp_grads": grads,
        }
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
