"""Worker for the multi-process sequence-parallel tests (run by torchrun, 2 ranks, gloo).

``python -m torch.distributed.run --nproc_per_node 2 sp_worker.py MODE OUT`` runs every
scenario of MODE and rank 0 saves ``{name: {...tensors...}}`` to OUT with ``torch.save``;
the tests compare them. Modes:

* ``sp``: collectives, the loss reduction and the sampler; then for each (model, loss,
  batch): loss and gradients with sp=1 (computed here, before sp is set up) and with sp=2
  (gradients averaged over the ranks, as DDP does); for MoE models (router logits on) also
  the HF model's own loss; and upstream's identity-backward reduction on the same batch.
* ``all``: the above, plus gradient accumulation through the real mmengine Runner +
  TrainLoop (DDP, OptimWrapper with ``accumulative_counts=2``, SGD with lr 0 so every step
  sees the same parameters): the gradient of each optimizer step, for dp=2 (global and
  micro-batch normalisation) and for sp=2 x dp=1, with a dense and an MoE model; and the
  reference gradient of the token mean over each window's rows computed by one process from
  the HF model's own logits (plus, for MoE, the mean of the HF model's router loss per
  forward).

The tests call :func:`session_results`: one ``all`` launch serves every test file.
"""

from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F

VOCAB = 128
IGNORE = -100


# models and batches -------------------------------------------------------------------------
#: the shape of the tiny Qwen2 and MoE models (4 attention heads: 2 per sp rank).
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
)
#: tiny families by kind: (config class, options). The MoE ones have router logits on, so
#: the HF loss adds router_aux_loss_coef * aux_loss; their routing is far from uniform (with
#: near-uniform router probabilities the balancing loss is ~top_k whatever the token
#: fractions, and a missing gather of the statistics would not show).
MOE_OPTIONS = dict(
    num_experts_per_tok=2,
    output_router_logits=True,
    router_aux_loss_coef=0.5,
    initializer_range=0.2,
    intermediate_size=64,
    num_key_value_heads=2,
)
FAMILIES = {
    "qwen2": ("Qwen2Config", dict(intermediate_size=128, num_key_value_heads=1)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, **MOE_OPTIONS)),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
            **MOE_OPTIONS,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(num_experts=4, moe_intermediate_size=32, head_dim=16, **MOE_OPTIONS),
    ),
    # the fork's DeepSeek-V2 (its own balance loss: per layer, group-limited routing); both
    # layers are MoE layers, so a per-layer sum and a pooled value differ.
    "deepseek_v2": (
        "DeepseekV2Config",
        dict(
            MOE_OPTIONS,
            num_key_value_heads=4,
            n_routed_experts=4,
            n_shared_experts=1,
            moe_intermediate_size=32,
            first_k_dense_replace=0,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=16,
            topk_method="group_limited_greedy",
            n_group=2,
            topk_group=1,
        ),
    ),
}


def build_hf(kind: str = "llama", attn: str = "sdpa"):
    import transformers

    from xtuner.demo import tiny_llama_config

    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(tiny_llama_config(VOCAB))
    else:
        config_cls, options = FAMILIES["qwen2" if kind == "qwen2_sliding" else kind]
        if kind == "qwen2_sliding":  # the second layer attends to a window of 3 tokens
            options = dict(options, use_sliding_window=True, sliding_window=3, max_window_layers=1)
        config = getattr(transformers, config_cls)(**SMALL, **options)
        if kind == "deepseek_v2":
            from xtuner.model.transformers_models.deepseek_v2 import DeepseekV2ForCausalLM

            model = DeepseekV2ForCausalLM(config)
        else:
            model = transformers.AutoModelForCausalLM.from_config(config)
    model.set_attn_implementation(attn)
    return model.float()


def build_sft(hf, loss=None, checkpointing: bool = False):
    from xtuner.model import SupervisedFinetune

    return SupervisedFinetune(llm=hf, loss=loss, use_activation_checkpointing=checkpointing)


def padded_batch() -> dict:
    """Two rows, the second padded at the end; a 5-token prompt without targets."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, VOCAB, (2, 16), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    ids[1, 11:] = 0
    labels[1, 11:] = IGNORE
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def packed_batch() -> dict:
    """One row of three packed documents (15 tokens: not divisible by sp, padded)."""
    g = torch.Generator().manual_seed(2)
    lengths = (5, 6, 4)
    ids = torch.randint(4, VOCAB, (1, sum(lengths)), generator=g)
    labels = ids.clone()
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    starts = torch.cumsum(torch.tensor((0, *lengths[:-1])), 0)
    for s in starts.tolist():
        labels[0, s : s + 2] = IGNORE
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids}


def zero_shard_batch() -> dict:
    """Targets only in the first half: the second sequence-parallel shard has none."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB, (1, 16), generator=g)
    labels = torch.full_like(ids, IGNORE)
    labels[0, 1:7] = ids[0, 1:7]
    return {"input_ids": ids, "labels": labels}


BATCHES = {"padded": padded_batch, "packed": packed_batch, "zero_shard": zero_shard_batch}


def loss_configs() -> dict:
    import xtuner.model  # noqa: F401  (registers the built-in losses)
    from xtuner.registry import LOSSES

    configs = {
        "ce": None,
        "ce_sample_smooth": dict(type="CrossEntropyLoss", reduction="sample", label_smoothing=0.1),
    }
    if "FocalLoss" in LOSSES.module_dict:
        configs["focal"] = dict(type="FocalLoss", gamma=2.0)
    if "ZLoss" in LOSSES.module_dict:
        configs["ce_plus_z"] = [dict(type="CrossEntropyLoss"), dict(type="ZLoss", loss_weight=0.1)]
    return configs


def loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model({k: v.clone() for k, v in batch.items()}, mode="loss")
    total = sum(v for k, v in out.items() if "loss" in k)
    total.backward()
    return total.detach(), _grads(model)


def hf_loss_and_grads(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The HF model's own loss in one process (for MoE: cross-entropy plus
    ``router_aux_loss_coef * aux_loss`` of the whole batch)."""
    model.zero_grad(set_to_none=True)
    loss = model.llm(**{k: v.clone() for k, v in batch.items()}, use_cache=False).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _grads(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def ddp_average(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What DDP does to the gradients: the mean over every rank."""
    for g in grads.values():
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return grads


# mode "sp" ----------------------------------------------------------------------------------
def check_collectives(results: dict) -> None:
    from mmengine.dataset import DefaultSampler

    from xtuner.parallel.sequence import (
        SequenceParallelSampler,
        all_to_all,
        gather_for_sequence_parallel,
        gather_forward_split_backward,
        get_sequence_parallel_group,
        get_sequence_parallel_rank,
        reduce_sequence_parallel_loss,
        split_for_sequence_parallel,
        split_forward_gather_backward,
    )

    rank, group = get_sequence_parallel_rank(), get_sequence_parallel_group()
    g = torch.Generator().manual_seed(5)
    full = torch.randn(2, 8, 4, 3, generator=g)  # [B, S, H, D]
    weight = torch.randn(2, 8, 4, 3, generator=g)
    x = full.chunk(2, dim=1)[rank].clone().requires_grad_()
    y = all_to_all(x, group, scatter_dim=2, gather_dim=1)  # -> [B, S, H/2, D]
    (y * weight.chunk(2, dim=2)[rank]).sum().backward()
    out = {
        "a2a_forward": (y.detach(), full.chunk(2, dim=2)[rank]),
        "a2a_backward": (x.grad, weight.chunk(2, dim=1)[rank]),
        "a2a_roundtrip": (all_to_all(y.detach(), group, scatter_dim=1, gather_dim=2), x.detach()),
        "split_upstream": (split_for_sequence_parallel(full, 1, group), full.chunk(2, dim=1)[rank]),
        "gather": (gather_for_sequence_parallel(x.detach(), 1, group), full),
    }
    whole = full.clone().requires_grad_()
    part = split_forward_gather_backward(whole, 1, group, grad_scale="down")
    (part * weight.chunk(2, dim=1)[rank]).sum().backward()
    out["split_forward"] = (part.detach(), full.chunk(2, dim=1)[rank])
    out["gather_backward_down"] = (whole.grad, weight / 2)
    local = full.chunk(2, dim=1)[rank].clone().requires_grad_()
    gathered = gather_forward_split_backward(local, 1, group, grad_scale="up")
    (gathered * weight).sum().backward()
    out["gather_forward"] = (gathered.detach(), full)
    out["split_backward_up"] = (local.grad, 2 * weight.chunk(2, dim=1)[rank])

    # reduce_sequence_parallel_loss: n = (3, 1), means (1, 2) -> (3 + 2) / 4.
    mean = torch.tensor(float(rank + 1), requires_grad=True)
    reduced = reduce_sequence_parallel_loss(mean, torch.tensor((3, 1)[rank]), group)
    reduced.backward()
    out["reduce_value"] = (reduced.detach(), torch.tensor(1.25))
    out["reduce_grad"] = (mean.grad, torch.tensor((0.75, 0.25)[rank]))
    # A shard without tokens (its mean is 0/0) contributes nothing and gets a zero gradient.
    mean = torch.tensor((1.5, float("nan"))[rank], requires_grad=True)
    reduced = reduce_sequence_parallel_loss(mean, (4, 0)[rank], group)
    reduced.backward()
    out["reduce_zero_value"] = (reduced.detach(), torch.tensor(1.5))
    out["reduce_zero_grad"] = (mean.grad, torch.tensor((1.0, 0.0)[rank]))

    sampler = SequenceParallelSampler(list(range(10)), shuffle=True, seed=3)
    mine = torch.tensor(list(sampler))
    theirs = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(theirs, mine)
    dist.barrier()
    # One process with mmengine's DefaultSampler draws the same order.
    single = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    out["sampler_same_on_sp_ranks"] = (theirs[0], theirs[1])
    out["sampler_order"] = (mine, single)
    assert isinstance(sampler, DefaultSampler)
    results["collectives"] = out


def upstream_identity_backward(model, batch: dict) -> dict[str, torch.Tensor]:
    """Upstream XTuner's reduction: the shard's token mean, forward value reduced over the
    group but an identity backward; then DDP averaging."""
    from xtuner.parallel.sequence import split_for_sequence_parallel

    class _Upstream(torch.autograd.Function):
        @staticmethod
        def forward(ctx, mean, n):
            total = torch.stack([torch.nan_to_num(mean.detach()) * n, n.float()])
            dist.all_reduce(total)
            return total[0] / total[1]

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    model.zero_grad(set_to_none=True)
    data = {k: v.clone() for k, v in batch.items()}
    inputs = model._attention_inputs(data)
    labels, weights = model._targets(data, inputs["position_ids"])
    inputs, labels, _, _ = split_for_sequence_parallel(inputs, labels, weights, {})
    hidden = model.backbone()(**inputs, use_cache=False).last_hidden_state
    logits = model.output_head()(hidden).float()
    mean = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
    _Upstream.apply(mean, (labels != IGNORE).sum()).backward()
    return ddp_average({n: p.grad.detach().clone() for n, p in model.named_parameters()})


def sp_scenarios() -> list[tuple[str, str, str, object, str, bool]]:
    """(name, model kind, attention, loss config, batch, activation checkpointing)."""
    cases = []
    for loss_name, loss in loss_configs().items():
        for batch in BATCHES:
            cases.append((f"llama-{loss_name}-{batch}", "llama", "sdpa", loss, batch, False))
    cases.append(("qwen2_kv1-ce-packed", "qwen2", "sdpa", None, "packed", False))
    cases.append(("qwen2_sliding-ce-packed", "qwen2_sliding", "sdpa", None, "packed", False))
    cases.append(("llama_eager-ce-padded", "llama", "eager", None, "padded", False))
    cases.append(("llama_eager-ce-packed", "llama", "eager", None, "packed", False))
    cases.append(("llama_ckpt-ce-packed", "llama", "sdpa", None, "packed", True))
    # MoE, router logits on: the router losses see the whole sequence's statistics.
    router = [
        dict(type="CrossEntropyLoss"),
        dict(type="RouterAuxLoss", coef=0.05),
        dict(type="RouterZLoss", coef=0.01),
    ]
    cases.append(("mixtral-ce-padded", "mixtral", "sdpa", None, "padded", False))
    cases.append(("qwen2_moe-ce-packed", "qwen2_moe", "sdpa", None, "packed", False))
    cases.append(("qwen3_moe-router_z-padded", "qwen3_moe", "sdpa", router, "padded", False))
    cases.append(("deepseek_v2-ce-padded", "deepseek_v2", "sdpa", None, "padded", False))
    return cases


#: scenarios whose reference is also the HF model's own loss (not only ours at sp=1).
HF_REFERENCE = ("mixtral-ce-padded", "deepseek_v2-ce-padded")


def run_sp(results: dict) -> None:
    from xtuner.parallel.sequence import init_sequence_parallel

    cases = sp_scenarios()
    reference, hf_reference = {}, {}
    for name, kind, attn, loss, batch, ckpt in cases:
        model = build_sft(build_hf(kind, attn), loss, ckpt)
        reference[name] = loss_and_grads(model, BATCHES[batch]())
        if name in HF_REFERENCE:
            hf_reference[name] = hf_loss_and_grads(model, BATCHES[batch]())
    upstream_ref = reference["llama-ce-padded"]
    init_sequence_parallel(2)
    check_collectives(results)
    for name, kind, attn, loss, batch, ckpt in cases:
        model = build_sft(build_hf(kind, attn), loss, ckpt)
        value, grads = loss_and_grads(model, BATCHES[batch]())
        results[name] = {
            "attn": model.llm.config._attn_implementation,
            "ref_loss": reference[name][0],
            "sp_loss": value,
            "ref_grads": reference[name][1],
            "sp_grads": ddp_average(grads),
        }
        if name in hf_reference:
            results[name]["hf_loss"], results[name]["hf_grads"] = hf_reference[name]
    model = build_sft(build_hf(), None)
    results["upstream"] = {
        "ref_grads": upstream_ref[1],
        "sp_grads": upstream_identity_backward(model, padded_batch()),
    }


# accumulation -------------------------------------------------------------------------------------
def micro_batch(seed: int, rows: int, length: int, n_targets: list[int]) -> dict:
    """``rows`` right-padded rows; row i has ``n_targets[i] + 1`` labelled tokens at the end
    of its real tokens (so ``n_targets[i]`` targets after the shift)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (rows, length), generator=g)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(n_targets):
        real = min(length, n + 4)
        mask[i, :real] = 1
        labels[i, real - n - 1 : real] = ids[i, real - n - 1 : real]
        ids[i, real:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def reference_grads(hf, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Token mean of cross-entropy over every row of ``batches``, row by row, from HF logits;
    for an MoE model plus the mean over the batches (the forwards of the window, on every
    rank) of the HF model's own ``router_aux_loss_coef * aux_loss`` of each batch."""
    hf.zero_grad(set_to_none=True)
    aux = 0.0
    if getattr(hf.config, "output_router_logits", False):
        for batch in batches:
            out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            aux = aux + hf.config.router_aux_loss_coef * out.aux_loss / len(batches)
    total, count = 0.0, 0
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            real = int(batch["attention_mask"][i].sum())
            ids = batch["input_ids"][i : i + 1, :real]
            labels = batch["labels"][i, :real]
            logits = hf(input_ids=ids, use_cache=False).logits[0].float()
            total = total + F.cross_entropy(
                logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum"
            )
            count += int((labels[1:] != IGNORE).sum())
    (total / count + aux).backward()
    return {n: p.grad.detach().clone() for n, p in hf.named_parameters()}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def first_item(items: list[dict]) -> dict:
    return {"data": {k: v.clone() for k, v in items[0].items()}, "data_samples": None}


def train_and_capture(
    name: str, items: list[dict], max_iters: int, normalization: str, sampler, kind: str = "llama"
):
    """Runs the real Runner/TrainLoop and returns the gradients seen by each optimizer step."""
    from mmengine.runner import Runner
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from xtuner.engine.runner import TrainLoop

    captured: list[dict[str, torch.Tensor]] = []

    def capture(optimizer, args, kwargs):
        captured.append(
            {
                id(p): p.grad.detach().clone()
                for group in optimizer.param_groups
                for p in group["params"]
            }
        )

    model = build_sft(build_hf(kind), None)
    names = {id(p): n.removeprefix("llm.") for n, p in model.named_parameters()}
    handle = register_optimizer_step_pre_hook(capture)
    runner = Runner(
        model=model,
        work_dir=tempfile.mkdtemp(),
        experiment_name=name,
        train_dataloader=dict(
            dataset=_ListDataset(items),
            sampler=dict(type=sampler, shuffle=False),
            batch_size=1,
            num_workers=0,
            collate_fn=first_item,
        ),
        train_cfg=dict(type=TrainLoop, max_iters=max_iters, loss_normalization=normalization),
        optim_wrapper=dict(optimizer=dict(type=torch.optim.SGD, lr=0.0), accumulative_counts=2),
        default_hooks=dict(checkpoint=None),
        launcher="pytorch",
        env_cfg=dict(dist_cfg=dict(backend="gloo")),
        log_level="WARNING",
    )
    runner.train()
    handle.remove()
    return [{names[k]: v for k, v in step.items()} for step in captured]


def run_accumulation_dp(results: dict) -> None:
    """dp=2 (no sequence parallel yet), accumulation 2, max_iters 3."""
    from mmengine.dataset import DefaultSampler

    # Iteration i, rank r reads items[2 * i + r]: very different numbers of targets.
    items = [
        micro_batch(10, 2, 16, [11, 9]),  # step 1, rank 0: 20 targets
        micro_batch(11, 1, 12, [1]),  # step 1, rank 1: 1 target
        micro_batch(12, 1, 16, [3]),  # step 1, rank 0: 3 targets
        micro_batch(13, 2, 16, [10, 12]),  # step 1, rank 1: 22 targets
        micro_batch(14, 1, 8, [2]),  # step 2 (short window), rank 0
        micro_batch(15, 2, 16, [12, 7]),  # step 2 (short window), rank 1
    ]
    hf = build_hf()
    results["dp2_reference"] = [reference_grads(hf, items[:4]), reference_grads(hf, items[4:])]
    for mode in ("global", "micro_batch"):
        results[f"dp2_{mode}"] = train_and_capture(f"dp2_{mode}", items, 3, mode, DefaultSampler)
    # MoE: the router loss of each forward, averaged over the window and the ranks.
    hf = build_hf("mixtral")
    results["dp2_moe_reference"] = [reference_grads(hf, items[:4]), reference_grads(hf, items[4:])]
    results["dp2_moe_global"] = train_and_capture(
        "dp2_moe", items, 3, "global", DefaultSampler, "mixtral"
    )


def run_accumulation_sp(results: dict) -> None:
    """sp=2 x dp=1, accumulation 2 (call after ``init_sequence_parallel(2)``)."""
    from xtuner.parallel.sequence import SequenceParallelSampler

    items = [micro_batch(20, 2, 16, [13, 2]), micro_batch(21, 1, 15, [4])]
    results["sp2_reference"] = [reference_grads(build_hf(), items)]
    results["sp2_global"] = train_and_capture(
        "sp2_global", items, 2, "global", SequenceParallelSampler
    )
    results["sp2_moe_reference"] = [reference_grads(build_hf("qwen3_moe"), items)]
    results["sp2_moe_global"] = train_and_capture(
        "sp2_moe", items, 2, "global", SequenceParallelSampler, "qwen3_moe"
    )


def run_all(results: dict) -> None:
    """Everything in one launch (process start-up dominates on small machines)."""
    run_accumulation_dp(results)
    run_sp(results)  # sets sequence parallel up (size 2)
    run_accumulation_sp(results)


# launching (used by the tests, in the pytest process) --------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(mode: str, out: str, timeout: int = 300) -> dict:
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
        mode,
        out,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return torch.load(out, weights_only=False)


def session_results(base_dir: str) -> dict:
    """Results of one ``all`` launch per test session (cached under pytest's base temp)."""
    out = os.path.join(base_dir, "sp_worker_results.pt")
    if os.path.exists(out):
        return torch.load(out, weights_only=False)
    return launch("all", out)


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results: dict = {}
    {"sp": run_sp, "all": run_all}[mode](results)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
