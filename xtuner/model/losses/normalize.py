"""Turns a loss's weighted sums into the values mmengine logs and backpropagates.

For each term, the *logged value* is the micro-batch mean over the whole sequence (all
sequence-parallel shards): ``sum(w*l) / sum(w)``. The *gradient* follows the normalisation
rule: with ``loss_denominator`` given (the training loop computes it for the whole
accumulation window on every rank, already divided by the number of ranks gradients are
averaged over and by the optim wrapper's accumulation divisor), the term backpropagates
``sum(w*l) / loss_denominator``; without it, the micro-batch mean. Value and gradient are
joined with a detached correction: ``shown + (g - g.detach())``.
"""

from __future__ import annotations

from torch import Tensor

from xtuner.parallel.comm import sp_all_reduce_sum
from xtuner.parallel.sequence import get_sequence_parallel_world_size

from .base import LossOutput


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    # A shard or a whole batch with no valid token contributes 0 (never 0/0).
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
) -> dict[str, Tensor]:
    """Named loss terms and metrics, ready for mmengine's ``parse_losses``.

    Args:
        output: what the loss returned for this shard.
        weights: weight key -> this shard's per-token weights.
        loss_denominator: weight key -> effective global denominator, or None for the
            micro-batch mean.
    """
    sp = get_sequence_parallel_world_size()
    result: dict[str, Tensor] = {}
    for name, term in output.terms.items():
        key = term_key(name, len(output.terms))
        if term.denominator is not None:
            result[key] = _safe_div(term.value, term.denominator)
            continue
        local_den = weights[term.weight_key].sum().to(term.value)
        group_den = sp_all_reduce_sum(local_den)
        shown = _safe_div(sp_all_reduce_sum(term.value), group_den)
        if loss_denominator is not None and term.weight_key in loss_denominator:
            grad_part = _safe_div(term.value, loss_denominator[term.weight_key].to(term.value))
        else:
            # Data-parallel averaging also divides by the sequence-parallel ranks, which all
            # hold parts of the same sequence: multiply back by sp.
            grad_part = _safe_div(term.value * sp, group_den)
        result[key] = shown.detach() + (grad_part - grad_part.detach())
    metrics = dict(output.metrics)
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
