"""Turns a loss's weighted sums into the values mmengine logs and backpropagates.

For each term, the *logged value* is the micro-batch mean over the whole sequence (all
sequence-parallel shards): ``sum(w*l) / sum(w)``. The *gradient* follows the normalisation
rule: with ``loss_denominator`` given (the training loop computes it for the whole
accumulation window on every rank, already divided by the number of ranks gradients are
averaged over and by the optim wrapper's accumulation divisor), the term backpropagates
``sum(w*l) / loss_denominator``; without it, the micro-batch mean. Value and gradient are
joined with a detached correction: ``shown + (g - g.detach())``.

A term that is NaN or Inf is handled by its ``nonfinite`` policy (see
:class:`~xtuner.model.losses.base.BaseLoss`): ``'raise'`` stops with the term's name and the
iteration; ``'skip'`` warns and replaces the term (and the terms sharing its gradient
computation) by a zero that still reaches every parameter.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from mmengine.logging import print_log
from torch import Tensor

from xtuner.parallel.comm import sp_all_reduce_sum
from xtuner.parallel.sequence import get_sequence_parallel_world_size

from .base import LossOutput


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    # A shard, a batch or a whole accumulation window with no valid token has a zero sum
    # and a zero denominator: it contributes 0 (never 0/0).
    return num / den.clamp_min(1e-12) if den.numel() else num * 0


def term_key(name: str, n_terms: int) -> str:
    """mmengine sums every key containing 'loss': name each term ``loss_<name>``."""
    if n_terms == 1:
        return "loss"
    return name if name.startswith("loss") else f"loss_{name}"


def finalize_loss(
    output: LossOutput,
    weights: dict[str, Tensor],
    loss_denominator: dict[str, Tensor] | None = None,
    anchor: Callable[[], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Named loss terms and metrics, ready for mmengine's ``parse_losses``.

    Args:
        output: what the loss returned for this shard.
        weights: weight key -> this shard's per-token weights.
        loss_denominator: weight key -> effective global denominator, or None for the
            micro-batch mean.
        anchor: makes the zero that replaces a skipped term (one reaching every trainable
            parameter directly, so no gradient passes through non-finite activations);
            None uses the loss's own anchor.

    Raises:
        FloatingPointError: a term with ``nonfinite='raise'`` is NaN or Inf.
    """
    sp = get_sequence_parallel_world_size()
    shown: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}
    for name, term in output.terms.items():
        key = term_key(name, len(output.terms))
        if term.denominator is not None:
            # The term's own denominator covers the whole sequence: the shards' values add
            # up (and data-parallel averaging divides by sp, multiplied back here).
            den = term.denominator.to(term.value)
            shown[key] = _safe_div(sp_all_reduce_sum(term.value.detach()), den)
            grads[key] = _safe_div(term.value * sp, den)
            continue
        local_den = weights[term.weight_key].sum().to(term.value)
        group_den = sp_all_reduce_sum(local_den)
        shown[key] = _safe_div(sp_all_reduce_sum(term.value), group_den)
        if loss_denominator is not None and term.weight_key in loss_denominator:
            # A window without any valid token (global denominator 0) contributes 0.
            grads[key] = _safe_div(term.value, loss_denominator[term.weight_key].to(term.value))
        else:
            # Data-parallel averaging also divides by the sequence-parallel ranks, which all
            # hold parts of the same sequence: multiply back by sp.
            grads[key] = _safe_div(term.value * sp, group_den)
    dropped = _nonfinite_terms(output, shown)
    result: dict[str, Tensor] = {}
    for key, value in shown.items():
        if key in dropped:
            zero = anchor() if anchor is not None else output.anchor
            zero = zero if zero is not None else value.new_zeros(())
            result[key] = zero if zero.requires_grad else zero.requires_grad_()
        else:
            result[key] = value.detach() + (grads[key] - grads[key].detach())
    result.update(_metrics(output))
    return result


def _nonfinite_terms(output: LossOutput, shown: dict[str, Tensor]) -> set[str]:
    """Keys of the terms to drop this step; raises for a bad term whose policy is 'raise'."""
    if not shown:
        return set()
    finite = torch.stack([v.detach().float() for v in shown.values()]).isfinite().tolist()
    keys = list(shown)
    names = dict(zip(keys, output.terms))
    bad = [key for key, ok in zip(keys, finite) if not ok]
    if not bad:
        return set()
    at = "" if output.iteration is None else f" at iteration {output.iteration}"
    described = ", ".join(f"'{key}' = {float(shown[key])}" for key in bad)
    raising = [key for key in bad if output.terms[names[key]].nonfinite in (None, "raise")]
    if raising:
        raise FloatingPointError(
            f"loss term {described}{at}. Check the data and the learning rate, or set "
            "nonfinite='skip' on the loss to drop such terms from a step with a warning."
        )
    groups = {output.terms[names[key]].grad_group for key in bad} - {None}
    dropped = set(bad) | {key for key in keys if output.terms[names[key]].grad_group in groups}
    shared = sorted(dropped - set(bad))
    also = f" (with {shared}, computed in the same pass)" if shared else ""
    print_log(
        f"loss term {described}{at}: skipped for this step{also} (nonfinite='skip')",
        logger="current",
        level=logging.WARNING,
    )
    return dropped


def _metrics(output: LossOutput) -> dict[str, Tensor]:
    metrics = dict(output.metrics)
    result: dict[str, Tensor] = {}
    if "acc_correct" in metrics:
        correct = sp_all_reduce_sum(metrics.pop("acc_correct"))
        total = sp_all_reduce_sum(metrics.pop("acc_total"))
        result["acc"] = _safe_div(correct, total).detach()
        result["num_tokens"] = total.detach()
    for name, value in metrics.items():
        if "loss" in name:
            raise ValueError(
                f"metric {name!r} contains 'loss': mmengine would add it to the total loss; "
                "rename it"
            )
        result[name] = value.detach()
    return result
