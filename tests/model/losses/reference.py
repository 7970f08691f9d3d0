"""Naive references for the loss tests: full logits, plain torch, loops for the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xtuner.model.losses import LogitTransform, LossContext, compute_weights, finalize_loss

IGNORE = -100


@dataclass
class Case:
    """A micro-batch as the model hands it to the loss (labels already shifted)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    position_ids: Tensor
    loss_weight: Tensor | None = None

    def leaves(self) -> list[Tensor]:
        return [t for t in (self.hidden, self.weight, self.bias) if t is not None]


def make_case(
    layout: str,
    dtype: torch.dtype = torch.float64,
    vocab: int = 13,
    dim: int = 6,
    seed: int = 0,
    bias: bool = False,
    loss_weight: bool = False,
) -> Case:
    """``layout``: ``'padded'`` (prompt and padding ignored, one row with no target) or
    ``'packed'`` (documents restarting their position ids at 0 within a row)."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "padded":
        batch, seq = 3, 8
        position_ids = torch.arange(seq).expand(batch, seq).clone()
        labels = torch.randint(0, vocab, (batch, seq), generator=gen)
        labels[0, :2] = IGNORE  # prompt
        labels[0, -1] = IGNORE  # end of sequence
        labels[1, 5:] = IGNORE  # padding
        labels[2] = IGNORE  # a row with no target at all
    elif layout == "packed":
        batch, seq = 2, 10
        position_ids = torch.tensor(
            [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]]
        )
        labels = torch.randint(0, vocab, (batch, seq), generator=gen)
        labels[0, [3, 6, 9]] = IGNORE  # last token of each document predicts nothing
        labels[0, 4] = IGNORE  # a prompt token
        labels[1, [5, 9]] = IGNORE
        labels[1, 6:8] = IGNORE
    else:
        raise ValueError(layout)
    scale = dim**-0.5
    hidden = (torch.randn(batch, seq, dim, generator=gen) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 2 * scale).to(dtype).requires_grad_()
    head_bias = torch.randn(vocab, generator=gen).to(dtype).requires_grad_() if bias else None
    lw = torch.rand(batch, seq, generator=gen) * 2 if loss_weight else None
    return Case(hidden, weight, head_bias, labels, position_ids, lw)


def naive_weights(
    labels: Tensor, position_ids: Tensor, reduction: str, loss_weight: Tensor | None = None
) -> Tensor:
    """Per-token weights by explicit loops over rows and documents."""
    out = torch.zeros(labels.shape, dtype=torch.float64)
    for row in range(labels.shape[0]):
        starts = [i for i in range(labels.shape[1]) if position_ids[row, i] == 0]
        bounds = list(zip(starts, starts[1:] + [labels.shape[1]]))
        for lo, hi in bounds:
            n = sum(int(labels[row, i] != IGNORE) for i in range(lo, hi))
            for i in range(lo, hi):
                if labels[row, i] == IGNORE:
                    continue
                w = 1.0 if loss_weight is None else float(loss_weight[row, i])
                if reduction == "sample":
                    w /= n
                elif reduction == "square":
                    w /= n**0.5
                out[row, i] = w
    return out


def full_logits(case: Case) -> Tensor:
    return F.linear(case.hidden, case.weight, case.bias)


def weighted_mean(per_token: Tensor, weights: Tensor, denominator: Tensor | None = None) -> Tensor:
    """``sum(w * l) / sum(w)`` (or ``/ denominator``) in the dtype of ``per_token``."""
    weights = weights.to(per_token.dtype)
    den = weights.sum() if denominator is None else denominator.to(per_token.dtype)
    return (per_token * weights).sum() / den


def safe_targets(labels: Tensor) -> Tensor:
    return labels.clamp_min(0)


def run_loss(
    loss,
    case: Case,
    extras: dict | None = None,
    iteration: int | None = None,
    transform: LogitTransform | None = None,
):
    """Runs a loss as the model does: weights, context, loss, finalize_loss."""
    weights = compute_weights(loss.weight_specs(), case.labels, case.position_ids, case.loss_weight)
    if extras is None:
        extras = loss.extra_inputs({}, case.labels)
    ctx = LossContext(
        hidden_states=case.hidden,
        head_weight=case.weight,
        head_bias=case.bias,
        labels=case.labels,
        weights=weights,
        extras=extras,
        iteration=iteration,
        logit_transform=transform or LogitTransform(),
    )
    return finalize_loss(loss(ctx), weights)


def total(result: dict[str, Tensor]) -> Tensor:
    """What mmengine back-propagates: the sum of every key containing 'loss'."""
    return sum(v for k, v in result.items() if "loss" in k)


def grads(value: Tensor, case: Case) -> list[Tensor]:
    return list(torch.autograd.grad(value, case.leaves()))


def as_float64(case: Case) -> Case:
    """The same case in float64, for a reference more exact than the float32 result."""

    def leaf(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.detach().double().requires_grad_()

    return Case(
        leaf(case.hidden),
        leaf(case.weight),
        leaf(case.bias),
        case.labels,
        case.position_ids,
        case.loss_weight,
    )


def assert_close_all(actual: list[Tensor], expected: list[Tensor]) -> None:
    """float32 against a float64 reference: rtol 1e-5; float64: rtol 1e-6 (the token weights
    are float32). Entries near zero get an absolute floor relative to the largest entry."""
    for a, e in zip(actual, expected):
        rtol = 1e-6 if a.dtype == torch.float64 else 1e-5
        scale = float(e.detach().abs().max()) if e.numel() else 1.0
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=rtol * 0.1 * scale)


def check_against(
    loss,
    naive,
    case: Case,
    reduction: str,
    extras: dict | None = None,
    transform: LogitTransform | None = None,
) -> None:
    """Value and gradients of ``loss`` equal ``naive(logits, targets) -> [B, S]`` averaged with
    naive weights (computed in float64); ``transform`` post-processes the logits."""
    result = run_loss(loss, case, extras, transform=transform)
    value = total(result)
    got = [value.detach()] + grads(value, case)
    ref = as_float64(case)
    logits = full_logits(ref)
    if transform is not None:
        # Written out here, independently of LogitTransform.
        logits = logits * transform.scale
        if transform.softcap is not None:
            logits = transform.softcap * torch.tanh(logits / transform.softcap)
    per_token = naive(logits, safe_targets(ref.labels))
    weights = naive_weights(ref.labels, ref.position_ids, reduction, ref.loss_weight)
    expected_value = weighted_mean(per_token, weights)
    expected = [expected_value.detach()] + grads(expected_value, ref)
    assert_close_all(got, expected)
