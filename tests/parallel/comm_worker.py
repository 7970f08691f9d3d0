"""Run by tests/parallel/test_comm.py with torchrun (2 processes, gloo): the cross-rank
decisions of :mod:`xtuner.parallel.comm` and a collective that times out."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from xtuner.model.losses import finalize_loss
from xtuner.model.losses.base import LossOutput, LossTerm
from xtuner.parallel.comm import nonfinite_ranks, token_weighted_mean


def _train_with_nan_on_rank_1(rank: int, policy: str) -> list[list[float]]:
    """SGD on a linear model under DDP, 3 steps; step 1's loss is NaN on rank 1 only."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    history, skipped = [], []
    for step in range(3):
        x = torch.full((2, 4), float(rank + step + 1))
        value = model(x).pow(2).sum()
        if step == 1 and rank == 1:
            value = value * float("nan")
        anchor = sum(p.reshape(-1)[:1].sum() * 0 for p in model.parameters())
        term = LossTerm(value, nonfinite=policy)
        output = LossOutput(terms={"ce": term}, iteration=step, anchor=anchor)
        result = finalize_loss(output, {"token": torch.ones(2)})
        loss = result["loss"]
        skipped.append(bool(result.get("nonfinite_skipped", False)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(model.module.weight.detach().flatten().tolist())
    return history + [skipped]


def main(out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
    rank = dist.get_rank()
    result: dict = {}
    values = torch.tensor([1.0, float("nan"), 2.0]) if rank == 1 else torch.tensor([1.0, 3.0, 2.0])
    result["nonfinite_ranks"] = nonfinite_ranks(values)
    logged = {"loss": torch.tensor(2.0 + rank), "num_tokens": torch.tensor(10.0 * (rank + 1))}
    result["logged"] = {k: float(v) for k, v in token_weighted_mean(logged).items()}
    result["skip"] = _train_with_nan_on_rank_1(rank, "skip")
    try:
        _train_with_nan_on_rank_1(rank, "raise")
        result["raise"] = None
    except FloatingPointError as exc:
        result["raise"] = str(exc)
    # A collective that one rank never joins: the other fails after the timeout, no hang.
    start = time.monotonic()
    if rank == 0:
        try:
            dist.all_reduce(torch.ones(1))
            result["timeout"] = None
        except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError or DistBackendError
            result["timeout"] = [type(exc).__name__, str(exc)[:200], time.monotonic() - start]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if rank == 1:
        time.sleep(6)  # stays away from rank 0's all_reduce until it has timed out


if __name__ == "__main__":
    main(sys.argv[1])
