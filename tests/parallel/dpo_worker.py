"""Worker for the multi-process DPO tests (run by torchrun, 2 ranks, gloo).

``python -m torch.distributed.run --nproc_per_node 2 dpo_worker.py OUT``; rank 0 saves
``{name: {...}}`` to OUT. Scenarios:

* ``acc_*``: 2 ranks x accumulation 2 through the real mmengine Runner + TrainLoop (DDP,
  OptimWrapper ``accumulative_counts=2``, SGD with lr 0 so every step sees the same
  parameters): the gradient of each optimizer step, and the gradient one process computes
  from all pairs of the window in one batch.
* ``sp_*``: loss and gradients with sp=1 (before sequence parallel is set up) and with sp=2
  (gradients averaged over the ranks, as DDP does), padded and packed layouts, DPO sigmoid,
  IPO (per-token averages), ORPO (a token term and a pair term) and a reward model.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist

VOCAB = 128


def build_model(kind: str = "dpo"):
    from transformers import LlamaForCausalLM

    from xtuner.demo import tiny_llama_config
    from xtuner.model.dpo import DPO
    from xtuner.model.orpo import ORPO
    from xtuner.model.reward import RewardModel

    torch.manual_seed(0)
    hf = LlamaForCausalLM(tiny_llama_config(VOCAB)).float()
    hf.set_attn_implementation("sdpa")
    common = dict(use_activation_checkpointing=False)
    if kind == "reward":
        model = RewardModel(llm=hf, loss_type="focal", **common)
        with torch.no_grad():
            model.v_head.weight.normal_(generator=torch.Generator().manual_seed(3))
        return model
    if kind == "orpo":
        return ORPO(llm=hf, beta=0.2, **common)
    model = DPO(llm=hf, beta=0.2, loss_type=kind, **common)
    # The policy moves away from its reference (the same on every rank).
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.llm.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def pairs(seed: int, n: int, reward: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(
            4, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g
        )
        pair = {}
        for side, label in (("chosen", 0), ("rejected", 1)):
            length = int(torch.randint(2, 8, (1,), generator=g))
            answer = torch.randint(4, VOCAB, (length,), generator=g).tolist()
            ids = prompt.tolist() + answer
            labels = [-100] * len(prompt) + answer
            if reward:
                ids, labels = ids + [3], [-100] * len(ids) + [label]
            pair[f"{side}_ids"], pair[f"{side}_labels"] = ids, labels
        out.append(pair)
    return out


def collate(items: list[dict], packed: bool) -> dict:
    from xtuner.dataset.collate_fns.preference_collate_fn import preference_collate_fn
    from xtuner.dataset.preference_dataset import PackedPreferenceDataset

    if not packed:
        return preference_collate_fn(items, return_hf_format=True)
    rows = PackedPreferenceDataset(items, max_packed_length=10_000, shuffle_before_pack=False)
    return preference_collate_fn([rows[0]], return_hf_format=True, use_varlen_attn=True)


def loss_and_grads(model, batch: dict):
    model.zero_grad(set_to_none=True)
    out = model({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
    total = sum(v for k, v in out.items() if "loss" in k)
    total.backward()
    grads = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    metrics = {k: v.detach() for k, v in out.items() if "loss" not in k}
    return total.detach(), grads, metrics


def ddp_average(grads: dict) -> dict:
    for g in grads.values():
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return grads


SP_CASES = {
    "sp_dpo_padded": ("sigmoid", False),
    "sp_dpo_packed": ("sigmoid", True),
    "sp_ipo_packed": ("ipo", True),
    "sp_orpo_packed": ("orpo", True),
    "sp_reward_packed": ("reward", True),
}


def run_sp(results: dict) -> None:
    from xtuner.parallel.sequence import init_sequence_parallel

    batches = {
        name: collate(pairs(7, 3, reward=kind == "reward"), packed)
        for name, (kind, packed) in SP_CASES.items()
    }
    reference = {
        name: loss_and_grads(build_model(kind), batches[name])
        for name, (kind, _) in SP_CASES.items()
    }
    init_sequence_parallel(2)
    for name, (kind, _) in SP_CASES.items():
        model = build_model(kind)
        value, grads, metrics = loss_and_grads(model, batches[name])
        results[name] = {
            "ref_loss": reference[name][0],
            "sp_loss": value,
            "ref_grads": reference[name][1],
            "sp_grads": ddp_average(grads),
            "ref_metrics": reference[name][2],
            "sp_metrics": metrics,
            "attn": model.llm.config._attn_implementation,
        }


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def first_item(items: list[dict]) -> dict:
    return {
        "data": {k: v.clone() if torch.is_tensor(v) else v for k, v in items[0].items()},
        "data_samples": None,
    }


def train_and_capture(items: list[dict], max_iters: int) -> list[dict]:
    from mmengine.dataset import DefaultSampler
    from mmengine.runner import Runner
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from xtuner.engine.runner import TrainLoop

    captured: list[dict] = []

    def capture(optimizer, args, kwargs):
        captured.append(
            {
                id(p): p.grad.detach().clone()
                for group in optimizer.param_groups
                for p in group["params"]
            }
        )

    model = build_model("sigmoid")
    names = {id(p): n for n, p in model.named_parameters()}
    handle = register_optimizer_step_pre_hook(capture)
    runner = Runner(
        model=model,
        work_dir=tempfile.mkdtemp(),
        experiment_name="dpo_acc",
        train_dataloader=dict(
            dataset=_ListDataset(items),
            sampler=dict(type=DefaultSampler, shuffle=False),
            batch_size=1,
            num_workers=0,
            collate_fn=first_item,
        ),
        train_cfg=dict(type=TrainLoop, max_iters=max_iters),
        optim_wrapper=dict(optimizer=dict(type=torch.optim.SGD, lr=0.0), accumulative_counts=2),
        default_hooks=dict(checkpoint=None),
        launcher="pytorch",
        env_cfg=dict(dist_cfg=dict(backend="gloo")),
        log_level="WARNING",
    )
    runner.train()
    handle.remove()
    return [{names[k]: v for k, v in step.items()} for step in captured]


def run_accumulation(results: dict) -> None:
    """Iteration i, rank r reads micro-batch 2 i + r; windows of 2 iterations."""
    sizes = [3, 1, 1, 2, 2, 1, 1, 3]
    groups = [pairs(20 + i, n) for i, n in enumerate(sizes)]
    items = [collate(g, packed=i % 2 == 0) for i, g in enumerate(groups)]
    steps = train_and_capture(items, max_iters=4)
    reference = []
    for window in (groups[:4], groups[4:]):
        all_pairs = [p for g in window for p in g]
        _, grads, _ = loss_and_grads(build_model("sigmoid"), collate(all_pairs, packed=False))
        reference.append(grads)
    results["acc"] = {"steps": steps, "reference": reference}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: str, timeout: int = 400) -> dict:
    """Runs this file with torchrun on 2 CPU processes and returns rank 0's results."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        os.path.abspath(__file__),
        out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results: dict = {}
    run_accumulation(results)
    run_sp(results)
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
