"""The checks behind ``xtuner check-loss`` (the command and its arguments:
:mod:`xtuner.tools.check_loss`)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import os.path as osp
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from xtuner.tools.utils import UserError, load_config

#: per-token losses sampled over all comparison batches (per loss), and logits rows at a time.
TOKEN_SAMPLE, TOKEN_CHUNK = 4096, 256
QUANTILES = {"p10": 0.1, "p50": 0.5, "p90": 0.9, "p99": 0.99}
#: the synthetic gradcheck batch: rows, positions, hidden size, vocabulary, tokens per chunk.
SYNTH_ROWS, SYNTH_LEN, SYNTH_DIM, SYNTH_VOCAB, SYNTH_CHUNK_TOKENS = 2, 12, 8, 16, 3
MEMORY_MEASURE = {
    "cpu": "peak of tensor memory torch allocated on the CPU during one forward and backward "
    "on the first batch, above what was live before it (torch.profiler memory events)",
    "cuda": "peak of torch.cuda.max_memory_allocated during one forward and backward on the "
    "first batch, above what was allocated before it",
}


@dataclass
class Check:
    """One row of the report: PASS, WARN, FAIL or SKIP, with a one-line detail."""

    name: str
    status: str
    detail: str


@dataclass
class Pass:
    """What one loss did on one batch (forward and backward, weights unchanged)."""

    value: float | None = None
    requires_grad: bool = False
    error: str | None = None
    nonfinite_terms: list[str] = field(default_factory=list)
    token_losses: dict[str, Tensor] | None = None


# the model, the data, one pass -----------------------------------------------------------
def build_model(cfg, device: torch.device) -> nn.Module:
    from xtuner.model.losses import BaseLoss
    from xtuner.registry import BUILDER

    model = BUILDER.build(copy.deepcopy(cfg.model))
    if not isinstance(getattr(model, "loss", None), BaseLoss):
        raise UserError(
            f"the config's model ({type(model).__name__}) has no pluggable loss (a 'loss' "
            "attribute deriving from xtuner.model.losses.BaseLoss): check-loss needs "
            "SupervisedFinetune or LLaVAModel"
        )
    return model.to(device)


def load_batches(cfg, count: int, seed: int) -> list[dict]:
    """The first ``count`` batches of the config's train dataloader (cycled if shorter)."""
    from mmengine.runner import Runner

    loader = Runner.build_dataloader(copy.deepcopy(cfg.train_dataloader), seed=seed)
    batches: list[dict] = []
    while len(batches) < count:
        before = len(batches)
        for batch in loader:
            batches.append(batch)
            if len(batches) == count:
                break
        if len(batches) == before:
            raise UserError("the config's train_dataloader yields no batch: check its dataset")
    return batches


def run_model(model: nn.Module, batch: dict) -> Tensor:
    """The total loss of a batch as mmengine computes it (the sum of every 'loss' key)."""
    data = model.data_preprocessor(batch, True)
    out = model(**data, mode="loss") if isinstance(data, dict) else model(*data, mode="loss")
    return sum(value for key, value in out.items() if "loss" in key)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def param_group(name: str) -> str:
    """The parameter group of a trainable tensor, from its name (LLaVA names included)."""
    if name.startswith("loss."):
        return "loss"
    if "projector" in name:
        return "projector"
    part = "vision encoder" if "visual_encoder" in name else "LLM"
    if "lora_" in name:
        return "LoRA adapters" if part == "LLM" else f"{part} LoRA adapters"
    return part


@contextlib.contextmanager
def loss_probe(loss: nn.Module) -> Iterator[dict]:
    """Records the context a loss receives and the output it returns (before any NaN policy)."""
    seen: dict[str, Any] = {}
    handles = [
        loss.register_forward_pre_hook(lambda _m, args: seen.update(ctx=args[0] if args else None)),
        loss.register_forward_hook(lambda _m, _args, out: seen.update(output=out)),
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def describe_error(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:400]}"


def loss_pass(model: nn.Module, loss: nn.Module, batch: dict, token_limit: int) -> Pass:
    """Forward and backward of one loss on one batch; gradients are left in ``.grad``."""
    model.loss = loss
    model.zero_grad(set_to_none=True)
    result = Pass()
    total = None
    with loss_probe(loss) as seen:
        try:
            total = run_model(model, batch)
        except FloatingPointError:
            pass  # the NaN policy raised: the probed output says which terms
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            result.error = describe_error(exc)
        output = seen.get("output")
        if output is not None:
            result.nonfinite_terms = [
                name
                for name, term in output.terms.items()
                if not bool(torch.isfinite(term.value.detach()).all())
            ]
        if seen.get("ctx") is not None and result.error is None:
            try:
                result.token_losses = token_losses(loss, seen["ctx"], token_limit)
            except Exception as exc:  # noqa: BLE001
                result.error = f"per-token losses: {describe_error(exc)}"
    if total is not None:
        result.value = float(total.detach())
        result.requires_grad = total.requires_grad
        if total.requires_grad:
            total.backward()
    return result


def token_losses(loss: nn.Module, ctx, limit: int) -> dict[str, Tensor] | None:
    """Per-token losses ``l_t`` of up to ``limit`` valid tokens, per term; None for full losses.

    Each token loss (also inside a composite) is asked through its own ``loss_and_grad`` on
    the logits of the tokens it weighs, which is what training differentiates.
    """
    from xtuner.model.losses import CompositeLoss, TokenLoss

    members = list(loss.losses) if isinstance(loss, CompositeLoss) else [loss]
    token_members = [m for m in members if isinstance(m, TokenLoss)]
    if not token_members:
        return None
    out: dict[str, list[Tensor]] = {}
    with torch.no_grad():
        for member in token_members:
            weights = ctx.weights[member.token_weight_key]
            valid = weights != 0
            hidden = ctx.hidden_states.detach()[valid][:limit]
            targets, weights = ctx.labels[valid][:limit], weights[valid][:limit].float()
            extras = {k: v[valid][:limit] for k, v in ctx.extras.items()}
            for start in range(0, hidden.shape[0], TOKEN_CHUNK):
                part = slice(start, start + TOKEN_CHUNK)
                logits = ctx.head_logits(hidden[part]).float()
                values, _ = member.loss_and_grad(
                    logits, targets[part], {k: v[part] for k, v in extras.items()}, weights[part]
                )
                for name, value in values.items():
                    out.setdefault(name, []).append(value.detach().float().cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


# 1. gradcheck of the loss alone ------------------------------------------------------------
def synthetic_batch(vocab: int, gen: torch.Generator) -> dict[str, Tensor]:
    """Two rows; the first packs two documents. Prompts are ignored; weights are random."""
    rows, length = SYNTH_ROWS, SYNTH_LEN
    input_ids = torch.randint(0, vocab, (rows, length), generator=gen)
    labels = input_ids.clone()
    labels[:, :3] = -100
    half = length // 2
    labels[0, half : half + 2] = -100
    position_ids = torch.arange(length).repeat(rows, 1)
    position_ids[0, half:] -= half
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": torch.ones_like(input_ids),
        "loss_weight": torch.rand(rows, length, generator=gen, dtype=torch.float64) + 0.5,
    }


def loss_inputs(loss: nn.Module, batch: dict) -> tuple[Tensor, dict[str, Tensor], dict]:
    """Shifted labels, float64 token weights and extras of a batch, as the model makes them."""
    from xtuner.model.losses import compute_weights
    from xtuner.model.sft import shift_labels, shift_tokens

    labels = batch["labels"]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(labels.shape[1]).expand_as(labels)
    shifted = shift_labels(labels, position_ids)
    loss_weight = batch.get("loss_weight")
    if loss_weight is not None:
        loss_weight = shift_tokens(loss_weight)
    weights = compute_weights(loss.weight_specs(), shifted, position_ids, loss_weight)
    weights = {key: value.double() for key, value in weights.items()}
    return shifted, weights, loss.extra_inputs(batch, shifted)


def gradcheck_loss(loss: nn.Module, vocab: int, real_batch: dict, seed: int) -> Check:
    """``torch.autograd.gradcheck`` of the loss module alone, in float64.

    Random hidden states (size 8) and head; targets from a synthetic batch with a vocabulary
    of 16, else (a loss that needs the model's vocabulary, e.g. a teacher's) of the model's
    size, else (a loss that needs batch fields the synthetic batch lacks) from the first
    real batch. Token losses run with 3 tokens per chunk, so chunking is exercised.

    A loss whose gradient is on purpose not the derivative of its value (a stop-gradient
    inside, such as DFT) declares ``gradient_matches_value = False``; a mismatch is then a
    warning.
    """
    from xtuner.model.losses import TokenLoss
    from xtuner.model.losses.base import LossInputError

    name = "gradcheck (float64, loss alone)"
    loss = copy.deepcopy(loss).to("cpu", torch.float64)
    for module in loss.modules():
        if isinstance(module, TokenLoss):
            module.chunk_size = SYNTH_CHUNK_TOKENS * module.logit_rows
    gen = torch.Generator().manual_seed(seed)
    real = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in real_batch.items()}
    candidates = [
        ("synthetic batch", lambda: synthetic_batch(SYNTH_VOCAB, gen), SYNTH_VOCAB),
        ("synthetic batch", lambda: synthetic_batch(vocab, gen), vocab),
        ("first real batch's targets", lambda: real, vocab),
    ]
    error: Exception | None = None
    for where, make_batch, n_vocab in candidates:
        batch = make_batch()
        try:
            fn = _loss_function(loss, batch)
            hidden = torch.randn(*batch["labels"].shape, SYNTH_DIM, generator=gen).double()
            head = torch.randn(n_vocab, SYNTH_DIM, generator=gen).double() / SYNTH_DIM**0.5
            hidden.requires_grad_()
            head.requires_grad_()
            value = fn(hidden, head)
        except LossInputError as exc:
            error = exc
            continue
        except FloatingPointError as exc:
            return Check(name, "FAIL", f"NaN/Inf: {exc} on a {where}")
        except Exception as exc:  # noqa: BLE001
            return Check(name, "FAIL", f"{describe_error(exc)} [{where}]")
        break
    else:
        return Check(name, "FAIL", f"the loss takes no batch: {describe_error(error)}")
    n_targets = int((batch["labels"] != -100).sum())
    where = f"{where}: {n_targets} targets, vocab {n_vocab}, {SYNTH_CHUNK_TOKENS} tokens per chunk"
    if not value.requires_grad:
        return Check(
            name,
            "FAIL",
            "detached: the loss value has no gradient path to the hidden states or the output "
            f"head (a .detach(), .item() or torch.no_grad() in the loss?) [{where}]",
        )
    try:
        grads = torch.autograd.grad(value, (hidden, head), allow_unused=True)
    except Exception as exc:  # noqa: BLE001
        return Check(name, "FAIL", f"backward: {describe_error(exc)} [{where}]")
    problems, detached, constant = [], [], []
    for label, grad in (("hidden states", grads[0]), ("output head", grads[1])):
        if grad is not None and not bool(grad.isfinite().all()):
            problems.append(f"NaN/Inf gradient w.r.t. the {label}")
        elif grad is None or not bool(grad.any()):
            slope = _directional_derivative(fn, hidden, head, label == "output head", gen)
            moves = abs(slope) > 1e-7 * (1 + abs(float(value.detach())))
            (detached if moves else constant).append(label)
    if detached:
        problems.append(
            f"detached: no gradient reaches the {' or the '.join(detached)}, although the loss "
            "value changes with them (a .detach(), .item() or non-differentiable op?)"
        )
    if len(constant) == 2:
        problems.append(
            "constant: the loss value changes neither with the hidden states nor the head"
        )
    if problems:
        return Check(name, "FAIL", f"{'; '.join(problems)} [{where}]")
    try:
        torch.autograd.gradcheck(fn, (hidden, head), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    except Exception as exc:  # noqa: BLE001 - GradcheckError or an error in backward
        text = str(exc).strip()
        first = text.splitlines()[0].rstrip(",") if text else type(exc).__name__
        declared = [
            type(m).__name__
            for m in loss.modules()
            if getattr(m, "gradient_matches_value", True) is False
        ]
        if declared:
            return Check(
                name,
                "WARN",
                f"differs from finite differences of the value, as {', '.join(declared)} "
                f"declares (gradient_matches_value=False: a stop-gradient) [{where}]",
            )
        return Check(
            name,
            "FAIL",
            f"the gradient differs from finite differences of the value ({first}); if the loss "
            "has a stop-gradient on purpose, declare gradient_matches_value = False on its "
            f"class [{where}]",
        )
    return Check(name, "PASS", f"gradient equals finite differences [{where}]")


def _loss_function(loss: nn.Module, batch: dict) -> Callable[[Tensor, Tensor], Tensor]:
    """(hidden states, head weight) -> the loss as training sums it, for one batch.

    Raises FloatingPointError naming NaN/Inf terms (whatever the loss's NaN policy).
    """
    from xtuner.model.losses import LossContext, finalize_loss

    labels, weights, extras = loss_inputs(loss, batch)

    def total(hidden: Tensor, head: Tensor) -> Tensor:
        output = loss(LossContext(hidden, head, None, labels, weights, extras, batch))
        bad = [k for k, term in output.terms.items() if not bool(term.value.isfinite().all())]
        if bad:
            raise FloatingPointError(f"loss term(s) {bad}")
        out = finalize_loss(output, weights)
        return sum(value for key, value in out.items() if "loss" in key)

    return total


def _directional_derivative(
    fn: Callable[[Tensor, Tensor], Tensor],
    hidden: Tensor,
    head: Tensor,
    along_head: bool,
    gen: torch.Generator,
) -> float:
    """Central difference of ``fn`` along a random unit direction in one input."""
    eps = 1e-5
    x = head if along_head else hidden
    direction = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    direction /= direction.norm()
    values = []
    with torch.no_grad():
        for sign in (1.0, -1.0):
            moved = (x + sign * eps * direction).requires_grad_()
            args = (hidden, moved) if along_head else (moved, head)
            values.append(float(fn(*args)))
    return (values[0] - values[1]) / (2 * eps)


# 2. comparison on real batches -------------------------------------------------------------
def compare(
    model: nn.Module, configured: nn.Module, baseline: nn.Module, batches: list[dict]
) -> tuple[list[Check], dict]:
    """Loss, gradient norm and cosine per batch; gradient-flow and NaN checks."""
    params = trainable(model)
    groups: dict[str, list[str]] = {}
    for name in params:
        groups.setdefault(param_group(name), []).append(name)
    limit = max(1, TOKEN_SAMPLE // len(batches))
    rows, errors = [], []
    nan_terms: dict[str, list[int]] = {}
    conf_tokens: dict[str, list[Tensor]] = {}
    base_tokens: dict[str, list[Tensor]] = {}
    conf_passes: list[Pass] = []
    # group -> [batches where the baseline reached it, where both did]; tensors lost.
    reach = {g: [0, 0] for g in groups}
    lost: dict[str, set[str]] = {g: set() for g in groups}
    nonfinite_grads: set[str] = set()
    model.eval()  # no dropout: both losses see the same network
    for index, batch in enumerate(batches):
        base = loss_pass(model, baseline, batch, limit)
        base_grads = {
            n: None if p.grad is None else p.grad.detach().clone() for n, p in params.items()
        }
        conf = loss_pass(model, configured, batch, limit)
        conf_passes.append(conf)
        if base.error:
            raise UserError(f"the baseline loss fails on batch {index}: {base.error}")
        if conf.error:
            errors.append(f"batch {index}: {conf.error}")
        for term in conf.nonfinite_terms:
            nan_terms.setdefault(term, []).append(index)
        for name, value in (conf.token_losses or {}).items():
            conf_tokens.setdefault(name, []).append(value)
        for name, value in (base.token_losses or {}).items():
            base_tokens.setdefault(name, []).append(value)
        dot = conf_sq = base_sq = 0.0
        for group, names in groups.items():
            conf_group = base_group = 0.0
            for name in names:
                g_conf, g_base = params[name].grad, base_grads[name]
                if g_conf is not None and not bool(g_conf.isfinite().all()):
                    nonfinite_grads.add(name)
                    continue
                c2 = 0.0 if g_conf is None else float(g_conf.double().square().sum())
                b2 = 0.0 if g_base is None else float(g_base.double().square().sum())
                if g_conf is not None and g_base is not None:
                    dot += float((g_conf.double() * g_base.double()).sum())
                if b2 > 0 and c2 == 0 and conf.value is not None:
                    lost[group].add(name)
                conf_group += c2
                base_group += b2
            conf_sq += conf_group
            base_sq += base_group
            if base_group > 0:
                reach[group][0] += 1
                reach[group][1] += conf_group > 0
        cosine = dot / math.sqrt(conf_sq * base_sq) if conf_sq > 0 and base_sq > 0 else None
        rows.append(
            {
                "batch": index,
                "loss": conf.value,
                "baseline_loss": base.value,
                "grad_norm": math.sqrt(conf_sq) if conf.value is not None else None,
                "baseline_grad_norm": math.sqrt(base_sq),
                "grad_cosine": cosine,
            }
        )
    model.zero_grad(set_to_none=True)
    conf_cat = {k: torch.cat(v) for k, v in conf_tokens.items()}
    base_cat = {k: torch.cat(v) for k, v in base_tokens.items()}
    checks = [_run_check(errors, len(batches))]
    checks.append(_nan_check(nan_terms, conf_cat, nonfinite_grads, conf_passes))
    output_check = _output_check(conf_passes, rows, groups, checks[-1].status == "FAIL")
    checks.append(output_check)
    for group, names in groups.items():
        checks.append(_group_check(group, names, reach[group], lost[group], rows, output_check))
    summary = {
        "batches": rows,
        "token_loss": {
            "configured": _quantiles(conf_cat) if conf_cat else "n/a",
            "baseline": _quantiles(base_cat) if base_cat else "n/a",
        },
    }
    return checks, summary


def _run_check(errors: list[str], n_batches: int) -> Check:
    name = "runs on real batches"
    if errors:
        return Check(name, "FAIL", f"{len(errors)} of {n_batches} batches raised: {errors[0]}")
    return Check(name, "PASS", f"{n_batches} batches, forward and backward")


def _nan_check(terms, tokens, nonfinite_grads, passes) -> Check:
    name = "NaN/Inf scan"
    problems = [
        f"term '{term}' on batch{'es' if len(idx) > 1 else ''} {', '.join(map(str, idx))}"
        for term, idx in terms.items()
    ]
    for term, values in tokens.items():
        bad = int((~values.isfinite()).sum())
        if bad:
            problems.append(f"{bad} of {values.numel()} per-token losses of '{term}'")
    if any(p.value is not None and not math.isfinite(p.value) for p in passes):
        problems.append("the loss value")
    if nonfinite_grads:
        example = sorted(nonfinite_grads)[0]
        problems.append(f"gradients of {len(nonfinite_grads)} tensors (e.g. {example})")
    if problems:
        return Check(name, "FAIL", "NaN/Inf in " + "; ".join(problems))
    if all(p.value is None for p in passes):
        return Check(name, "SKIP", "no batch gave a loss value")
    n_tokens = sum(v.numel() for v in tokens.values())
    what = f", {n_tokens} per-token losses" if tokens else ""
    return Check(name, "PASS", f"loss values, terms{what} and gradients are finite")


def _output_check(passes: list[Pass], rows: list[dict], groups, nan_failed: bool) -> Check:
    name = "output depends on the model"
    ran = [p for p in passes if p.value is not None]
    if not ran or nan_failed:
        return Check(name, "SKIP", "no finite loss value to test")
    where = ", ".join(f"{g}: {len(n)} tensors" for g, n in groups.items())
    if not any(p.requires_grad for p in ran):
        return Check(
            name,
            "FAIL",
            f"detached: the loss value has no gradient path to the trainable parameters ({where})",
        )
    if all(not row["grad_norm"] for row in rows):
        if len(ran) == 1:
            what = "detached or constant"
        elif len({p.value for p in ran}) == 1:
            what = "constant: the same value on every batch and"
        else:
            what = "detached: the value changes from batch to batch but there is"
        return Check(name, "FAIL", f"{what} zero gradient for every trainable tensor ({where})")
    return Check(name, "PASS", "the loss has a gradient path to the trainable parameters")


def _group_check(group, names, reach, lost, rows, output_check: Check) -> Check:
    name = f"gradients: {group} ({len(names)} tensor{'s' if len(names) > 1 else ''})"
    if output_check.status != "PASS":
        return Check(name, "SKIP", f"see '{output_check.name}'")
    base_reached, both = reach
    if base_reached == 0:
        return Check(
            name,
            "WARN",
            "no gradient under the baseline either: these parameters take no part in the loss "
            "on these batches",
        )
    if both < base_reached:
        return Check(
            name,
            "FAIL",
            f"no gradient reaches them on {base_reached - both} of {base_reached} batches, "
            f"where the baseline's does",
        )
    if lost:
        example = sorted(lost)[0]
        return Check(
            name,
            "FAIL",
            f"{len(lost)} of {len(names)} tensors get no gradient where the baseline's reaches "
            f"them (e.g. {example})",
        )
    return Check(name, "PASS", "finite, non-zero gradients wherever the baseline's are")


def _quantiles(tokens: dict[str, Tensor]) -> dict[str, dict]:
    out = {}
    for term, values in tokens.items():
        finite = values[values.isfinite()].double()
        stats: dict[str, Any] = {
            "tokens": values.numel(),
            "nonfinite": values.numel() - finite.numel(),
        }
        if finite.numel():
            probs = torch.tensor(list(QUANTILES.values()), dtype=torch.float64)
            stats.update(
                {
                    "min": float(finite.min()),
                    "mean": float(finite.mean()),
                    "max": float(finite.max()),
                }
            )
            stats.update(zip(QUANTILES, torch.quantile(finite, probs).tolist()))
        out[term] = stats
    return out


# 3. A/B run ------------------------------------------------------------------------------
def build_optimizer(cfg, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    from mmengine.registry import OPTIMIZERS

    optim = (cfg.get("optim_wrapper") or {}).get("optimizer")
    if optim is None:
        raise UserError("the config has no optim_wrapper.optimizer: the A/B run needs one")
    return OPTIMIZERS.build(dict(copy.deepcopy(optim), params=params))


def clip_gradients(cfg, params: list[nn.Parameter]) -> None:
    clip = copy.deepcopy((cfg.get("optim_wrapper") or {}).get("clip_grad"))
    if not clip:
        return
    kind = clip.pop("type", "norm")
    if kind == "value":
        torch.nn.utils.clip_grad_value_(params, **clip)
    else:
        torch.nn.utils.clip_grad_norm_(params, **clip)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ab_run(
    model: nn.Module,
    loss: nn.Module,
    baseline: nn.Module,
    cfg,
    batches: list[dict],
    steps: int,
    seed: int,
    device: torch.device,
) -> dict:
    """``steps`` optimizer steps with ``loss`` (the weights must be the initial ones).

    Before each step the baseline objective of the batch is evaluated without dropout and
    without gradient (not timed), so the runs of different losses compare on one scale.
    """
    params = list(trainable(model).values())
    optimizer = build_optimizer(cfg, params)
    torch.manual_seed(seed)
    record: dict[str, Any] = {
        "loss": [],
        "baseline_objective": [],
        "step_time_s": [],
        "error": None,
    }
    for step in range(steps):
        batch = batches[step % len(batches)]
        model.eval()
        model.loss = baseline
        try:
            with torch.no_grad():
                record["baseline_objective"].append(float(run_model(model, batch)))
            model.train()
            model.loss = loss
            _sync(device)
            start = time.perf_counter()
            total = run_model(model, batch)
            if total.requires_grad:  # a detached loss trains nothing (reported elsewhere)
                total.backward()
                clip_gradients(cfg, params)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _sync(device)
        except Exception as exc:  # noqa: BLE001 - reported in the A/B check
            record["error"] = f"step {step}: {describe_error(exc)}"
            break
        record["step_time_s"].append(time.perf_counter() - start)
        record["loss"].append(float(total.detach()))
        if not math.isfinite(record["loss"][-1]):
            record["error"] = f"step {step}: the loss is {record['loss'][-1]}"
            break
    model.loss = loss
    model.zero_grad(set_to_none=True)
    times = record["step_time_s"]
    record["median_step_s"] = statistics.median(times) if times else None
    return record


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silences C-level stderr (the profiler's start/stop banners)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float | None:
    """Peak tensor memory allocated while ``fn`` runs, above what was live before (MiB)."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - start) / 2**20
    if device.type != "cpu":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():
        prof.start()
    try:
        fn()
    finally:
        with _quiet_stderr():
            prof.stop()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def measure_memory(model: nn.Module, loss: nn.Module, batch: dict, device) -> float | None:
    model.train()
    model.loss = loss
    model.zero_grad(set_to_none=True)

    def step() -> None:
        run_model(model, batch).backward()

    try:
        return peak_memory_mib(step, device)
    except Exception:  # noqa: BLE001 - memory is reported as unknown, the A/B check decides
        return None
    finally:
        model.zero_grad(set_to_none=True)


def ab_compare(model, configured, baseline, cfg, batches, steps, seed, device) -> dict:
    """Both A/B runs from the same initial weights; the weights are restored afterwards."""
    initial = {n: p.detach().clone() for n, p in trainable(model).items()}

    def restore() -> None:
        with torch.no_grad():
            for n, p in trainable(model).items():
                p.copy_(initial[n])

    runs = {}
    for label, loss in (("configured", configured), ("baseline", baseline)):
        restore()
        peak = measure_memory(model, loss, batches[0], device)
        runs[label] = ab_run(model, loss, baseline, cfg, batches, steps, seed, device)
        runs[label]["peak_memory_mib"] = peak
    restore()
    model.loss = configured
    return runs


def write_ab_files(runs: dict, out_dir: str, names: dict[str, str], title: str) -> tuple[str, str]:
    """``ab_curves.csv`` (one row per step) and ``ab_curves.png`` (two panels)."""
    from xtuner.tools.plot_log import Panel, plot_panels

    csv_path = osp.join(out_dir, "ab_curves.csv")
    columns = ["loss", "baseline_objective", "step_time_s"]
    steps = max(len(run["baseline_objective"]) for run in runs.values())
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["step"] + [f"{label}_{c}" for label in runs for c in columns])
        for step in range(steps):
            row = [step]
            for run in runs.values():
                row += [run[c][step] if step < len(run[c]) else "" for c in columns]
            writer.writerow(row)
    own = Panel("training loss (each run's own loss)", ylabel="loss")
    common = Panel(f"{names['baseline']} of each run (eval mode)", ylabel="loss")
    for label, run in runs.items():
        line = f"{label}: {names[label]}"
        own.series[line] = (list(range(len(run["loss"]))), run["loss"])
        objective = run["baseline_objective"]
        common.series[line] = (list(range(len(objective))), objective)
    png_path = plot_panels([own, common], osp.join(out_dir, "ab_curves.png"), title)
    return csv_path, png_path


def _ab_check(runs: dict) -> Check:
    name = "A/B run"
    failed = [f"{label}: {run['error']}" for label, run in runs.items() if run["error"]]
    if failed:
        return Check(name, "FAIL", "; ".join(failed))
    conf = runs["configured"]["baseline_objective"]
    steps = len(runs["configured"]["loss"])
    detail = f"{steps} steps each"
    if len(conf) > 1 and conf[-1] > conf[0]:
        return Check(name, "WARN", f"{detail}; the baseline objective rose under the loss")
    return Check(name, "PASS", detail)


# 4. report ---------------------------------------------------------------------------------
def loss_name(loss: nn.Module) -> str:
    from xtuner.model.losses import CompositeLoss

    if isinstance(loss, CompositeLoss):
        return "+".join(type(m).__name__ for m in loss.losses)
    return type(loss).__name__


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _mean(values: list) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def side_by_side(report: dict) -> list[list[str]]:
    """Rows of (measure, configured, baseline) for the terminal."""
    rows = []
    batches = report["comparison"]["batches"] if report["comparison"] else []
    if batches:
        n = len(batches)
        rows.append(
            [
                f"loss (mean of {n} batches)",
                _fmt(_mean([b["loss"] for b in batches])),
                _fmt(_mean([b["baseline_loss"] for b in batches])),
            ]
        )
        rows.append(
            [
                "gradient norm (mean)",
                _fmt(_mean([b["grad_norm"] for b in batches])),
                _fmt(_mean([b["baseline_grad_norm"] for b in batches])),
            ]
        )
        cosines = [b["grad_cosine"] for b in batches if b["grad_cosine"] is not None]
        text = f"mean {_mean(cosines):.4f}, min {min(cosines):.4f}" if cosines else "n/a"
        rows.append(["gradient cosine with baseline", text, "1"])
        quant = "/".join(QUANTILES) + "/max"
        per_term: dict[str, list[str]] = {}
        for column, side in enumerate(("configured", "baseline")):
            stats = report["comparison"]["token_loss"][side]
            if stats == "n/a":
                per_term.setdefault("", ["", ""])[column] = "n/a (full loss)"
                continue
            for term, s in stats.items():
                text = " / ".join(_fmt(s.get(k), 3) for k in [*QUANTILES, "max"])
                if s["nonfinite"]:
                    text += f" ({s['nonfinite']} NaN/Inf)"
                per_term.setdefault(term, ["", ""])[column] = text
        for term, cells in per_term.items():
            rows.append([f"per-token loss {f'{term!r} ' if term else ''}{quant}", *cells])
    ab = report.get("ab")
    if ab:
        conf, base = ab["configured"], ab["baseline"]

        def first_last(values: list) -> str:
            return f"{_fmt(values[0])} -> {_fmt(values[-1])}" if values else "n/a"

        rows.append(
            ["A/B own loss, first -> last", first_last(conf["loss"]), first_last(base["loss"])]
        )
        rows.append(
            [
                f"A/B {report['baseline']}, first -> last",
                first_last(conf["baseline_objective"]),
                first_last(base["baseline_objective"]),
            ]
        )
        rows.append(
            [
                "time per step (median, s)",
                _fmt(conf["median_step_s"], 3),
                _fmt(base["median_step_s"], 3),
            ]
        )
        rows.append(
            [
                "peak memory fwd+bwd (MiB)",
                _fmt(conf["peak_memory_mib"], 4),
                _fmt(base["peak_memory_mib"], 4),
            ]
        )
    return rows


def print_report(report: dict) -> None:
    print(
        f"\ncheck-loss {report['config']}: loss {report['loss']} vs baseline "
        f"{report['baseline']} ({report['batches']} batches, {report['steps']} A/B steps, "
        f"{report['device']})\n"
    )
    checks = [[c["name"], c["status"], c["detail"]] for c in report["checks"]]
    print(table(checks, ["check", "status", "detail"]))
    rows = side_by_side(report)
    if rows:
        print()
        print(table(rows, ["", report["loss"], report["baseline"]]))
    if report.get("ab"):
        print(f"\npeak memory: {report['ab']['memory_measure']}")
    print(f"files: {', '.join(report['files'])}")


def check(args: argparse.Namespace) -> dict:
    """Runs every check; returns the report (also written to ``<out>/report.json``).

    Args:
        args: what :func:`xtuner.tools.check_loss.parse_args` returns (``baseline`` parsed).
    """
    from mmengine.logging import print_log

    from xtuner._compat import adapt_config_to_device
    from xtuner.model.losses import LossConfigError, build_loss

    cfg = load_config(args.config, args.cfg_options)
    for change in adapt_config_to_device(cfg):
        print_log(change, "current", level=30)
    cfg_name = osp.splitext(osp.basename(cfg.filename))[0]
    out_dir = args.out or osp.join("work_dirs", cfg_name, "check_loss")
    os.makedirs(out_dir, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        baseline = build_loss(args.baseline)
    except LossConfigError as exc:
        raise UserError(f"--baseline: {exc}") from exc
    torch.manual_seed(args.seed)
    model = build_model(cfg, device)
    configured = model.loss
    baseline.to(device)
    batches = load_batches(cfg, max(args.batches, args.steps, 1), args.seed)
    report: dict[str, Any] = {
        "config": cfg_name,
        "loss": loss_name(configured),
        "baseline": loss_name(baseline),
        "device": str(device),
        "batches": args.batches,
        "steps": args.steps,
        "checks": [],
        "comparison": None,
        "ab": None,
        "files": [],
    }
    vocab = model.output_head().vocab_size
    first = batches[0].get("data", batches[0])
    if hasattr(model, "loss_batch"):  # fields the model adds for its loss (DPO: ref_logps)
        with torch.no_grad():
            first = model.loss_batch(first)
    checks = [gradcheck_loss(configured, vocab, first, args.seed)]
    compare_checks, report["comparison"] = compare(
        model, configured, baseline, batches[: args.batches]
    )
    checks += compare_checks
    # A/B needs a loss value on every batch (NaN terms under nonfinite='skip' still give one).
    runs_ok = all(row["loss"] is not None for row in report["comparison"]["batches"])
    if args.steps and runs_ok:
        runs = ab_compare(model, configured, baseline, cfg, batches, args.steps, args.seed, device)
        names = {"configured": report["loss"], "baseline": report["baseline"]}
        title = f"check-loss {cfg_name}: {names['configured']} vs {names['baseline']}"
        csv_path, png_path = write_ab_files(runs, out_dir, names, title)
        report["ab"] = dict(runs, memory_measure=MEMORY_MEASURE.get(device.type, "n/a"))
        report["files"] += [csv_path, png_path]
        checks.append(_ab_check(runs))
    elif args.steps:
        checks.append(Check("A/B run", "SKIP", "the loss fails on real batches"))
    report["checks"] = [asdict(c) for c in checks]
    failed = [c for c in checks if c.status == "FAIL"]
    report["status"] = "fail" if failed else "pass"
    report["reason"] = "; ".join(f"{c.name}: {c.detail}" for c in failed) or None
    json_path = osp.join(out_dir, "report.json")
    report["files"].append(json_path)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return report
