"""Worker for the InternVL sequence-parallel test (run by torchrun: 2 ranks, gloo, fp32).

``python -m torch.distributed.run --nproc_per_node 2 internvl_sp_worker.py MODEL OUT [remote]``
(``remote``: MODEL is a remote-code checkpoint, ``test_internvl_remote``'s batch): for
each loss, the loss and every gradient of the tiny InternVL at MODEL (all parts trainable) on
the batch of ``test_internvl.batch`` (one-, two- and no-image samples), first with sp=1
(before sequence parallel is set up), then with sp=2 (gradients averaged over the 2 ranks, as
DDP does). Rank 0 saves them to OUT.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

LOSSES = {"ce": None, "focal_sample": dict(type="FocalLoss", gamma=2.0, reduction="sample")}


def loss_and_grads(
    path: str, loss, remote: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    from tests.model.test_internvl import batch, build, grads
    from tests.model.test_internvl_remote import remote_batch

    model = build(path, loss=loss, attn_implementation="sdpa", trust_remote_code=remote)
    out = model(remote_batch(path) if remote else batch(path), mode="loss")
    out["loss"].backward()
    kernels = {
        "text": model._part("language").config._attn_implementation,
        "vision": model._part("vision").config._attn_implementation,
    }
    return out["loss"].detach(), grads(model), kernels


def main() -> None:
    from xtuner.parallel.sequence import init_sequence_parallel

    path, out = sys.argv[1:3]
    remote = sys.argv[3:] == ["remote"]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    reference = {name: loss_and_grads(path, loss, remote) for name, loss in LOSSES.items()}
    init_sequence_parallel(2)
    results = {}
    for name, loss in LOSSES.items():
        value, grads, kernels = loss_and_grads(path, loss, remote)
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
        results[name] = {
            "ref_loss": reference[name][0],
            "ref_grads": reference[name][1],
            "sp_loss": value,
            "sp_grads": grads,
            "sp_kernels": kernels,
        }
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
