"""The loss contract: what a loss receives, what it returns, and the two base classes.

A model hands its loss a :class:`LossContext`: the final hidden states (not logits), the
output head's weight and bias, the labels already shifted to next-token targets, one
per-token weight tensor per reduction mode, and per-token extras. The loss returns a
:class:`LossOutput`: named weighted *sums* (``sum_t w_t * l_t``) and metrics. The framework
(:mod:`xtuner.model.losses.normalize`) divides each sum by the right denominator: the
micro-batch's, or the global one of the accumulation window on every rank, and takes care
of sequence-parallel shards. A loss never divides by a token count itself.

Two levels for authors:

* :class:`TokenLoss` -- write :meth:`TokenLoss.token_loss`, the loss of each target token
  from its logits row. The base class computes logits chunk by chunk from the hidden
  states and hands back each chunk's gradient computed during the forward pass, so a
  ``[tokens x vocab]`` tensor never exists whole and nothing is recomputed in backward.
* :class:`BaseLoss` -- override :meth:`BaseLoss.forward` and return any terms (e.g. a
  sequence-level objective), optionally with a denominator of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xtuner.utils.constants import IGNORE_INDEX

REDUCTIONS = ("token", "sample", "square")


@dataclass(frozen=True)
class WeightSpec:
    """How per-token weights are made: a reduction mode, an extra ignored id, a scaling hook."""

    reduction: str
    ignore_index: int | None = None
    scale: Callable[[Tensor, Tensor], Tensor] | None = None


@dataclass
class LossContext:
    """Everything a loss may use for one micro-batch (one sequence-parallel shard).

    Attributes:
        hidden_states: final hidden states ``[B, S, D]`` (after the final norm).
        head_weight: output head weight ``[V, D]``.
        head_bias: output head bias ``[V]`` or None.
        labels: next-token targets ``[B, S]``; ``IGNORE_INDEX`` where there is none.
        weights: weight key (:attr:`BaseLoss.weight_key`) -> per-token weights ``[B, S]``
            (0 where ignored), already including the data's ``loss_weight`` and the loss's
            own token scaling.
        extras: per-token tensors ``[B, S, ...]`` that the loss asked for
            (:meth:`BaseLoss.extra_inputs`), split like the labels.
        batch: the model's whole input batch before any sequence-parallel split.
        iteration: the training iteration, when known (for messages).
    """

    hidden_states: Tensor
    head_weight: Tensor
    head_bias: Tensor | None
    labels: Tensor
    weights: dict[str, Tensor]
    extras: dict[str, Tensor] = field(default_factory=dict)
    batch: dict[str, Any] = field(default_factory=dict)
    iteration: int | None = None


@dataclass
class LossTerm:
    """One named term: a weighted sum and how it is normalised.

    Attributes:
        value: ``sum_t w_t * l_t`` over this shard's tokens (a scalar tensor with grad).
        weight_key: which weights (and so which denominator) apply; see
            :attr:`BaseLoss.weight_key`.
        denominator: set only by full losses that normalise by something else (e.g. the
            number of preference pairs); then ``value / denominator`` is used as it is.
    """

    value: Tensor
    weight_key: str = "token"
    denominator: Tensor | None = None


@dataclass
class LossOutput:
    """Named terms (logged as ``loss_<name>``, summed for backward) and metrics."""

    terms: dict[str, LossTerm]
    metrics: dict[str, Tensor] = field(default_factory=dict)


class BaseLoss(nn.Module):
    """Base of every loss. Subclasses override :meth:`forward` (a full loss).

    Args:
        reduction: ``'token'`` (every valid token weighs the same), ``'sample'`` (each sample
            weighs the same: tokens weighted by ``1/n_tokens``) or ``'square'`` (tokens
            weighted by ``1/sqrt(n_tokens)``).
        ignore_index: an extra label id to ignore besides ``-100`` (e.g. a pad id).
        name: the name this loss's term is logged under (``loss_<name>``).
    """

    #: batch fields this loss needs, with the data option that produces each (for errors).
    required_fields: dict[str, str] = {}
    #: the term name when none is given.
    default_name: str = "loss"

    def __init__(
        self, reduction: str = "token", ignore_index: int | None = None, name: str | None = None
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"{type(self).__name__}: reduction={reduction!r} is not one of {REDUCTIONS}"
            )
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.name = name or self.default_name

    @property
    def weight_key(self) -> str:
        """Names the per-token weights this loss reads (shared by losses that agree)."""
        if self.ignore_index is None and not self.scales_token_weights:
            return self.reduction
        return f"{self.reduction}@{self.name}"

    @property
    def scales_token_weights(self) -> bool:
        """Whether :meth:`scale_token_weights` changes the weights."""
        return type(self).scale_token_weights is not BaseLoss.scale_token_weights

    def weight_specs(self) -> dict[str, WeightSpec]:
        """Weight key -> how to compute those weights, for every term this loss returns."""
        scale = self.scale_token_weights if self.scales_token_weights else None
        return {self.weight_key: WeightSpec(self.reduction, self.ignore_index, scale)}

    def scale_token_weights(self, labels: Tensor, weights: Tensor) -> Tensor:
        """Hook to scale per-token weights by the target (e.g. class weights)."""
        return weights

    def extra_inputs(self, batch: dict[str, Any], labels: Tensor) -> dict[str, Tensor]:
        """Per-token tensors ``[B, S, ...]`` computed before any sequence-parallel split.

        The default hands over the ``required_fields`` of the batch. A distillation loss
        runs its teacher here.
        """
        return {key: batch[key] for key in self.required_fields}

    def forward(self, ctx: LossContext) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(ctx)")

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, name={self.name!r}"


class TokenLoss(BaseLoss):
    """A loss defined token by token: implement :meth:`token_loss`.

    Args:
        chunk_size: how many tokens' logits exist at a time. Memory of the loss is
            ``O(chunk_size x vocab)``; 0 or None computes all logits at once.
        **kwargs: see :class:`BaseLoss`.
    """

    def __init__(self, chunk_size: int | None = 1024, **kwargs):
        super().__init__(**kwargs)
        if chunk_size is not None and chunk_size < 0:
            raise ValueError(f"{type(self).__name__}: chunk_size must be >= 0, got {chunk_size}")
        self.chunk_size = chunk_size or 0

    def token_loss(
        self, logits: Tensor, targets: Tensor, extras: dict[str, Tensor]
    ) -> Tensor | dict[str, Tensor]:
        """Loss of each target token.

        Args:
            logits: ``[n, V]`` float32 logits of ``n`` valid tokens.
            targets: ``[n]`` target ids.
            extras: the per-token extras of those tokens, ``[n, ...]`` each.

        Returns:
            ``[n]`` per-token losses, or a dict of them for several terms (logged as
            ``loss_<name>_<key>``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement token_loss")

    def forward(self, ctx: LossContext) -> LossOutput:
        weights = ctx.weights[self.weight_key]
        valid = weights != 0
        hidden = ctx.hidden_states[valid]
        targets = ctx.labels[valid]
        tok_w = weights[valid].float()
        extras = {k: v[valid] for k, v in ctx.extras.items()}
        sums, n_correct = chunked_token_loss(
            self, hidden, ctx.head_weight, ctx.head_bias, targets, tok_w, extras
        )
        terms = {
            (self.name if key is None else f"{self.name}_{key}"): LossTerm(value, self.weight_key)
            for key, value in sums.items()
        }
        metrics = {"acc_correct": n_correct, "acc_total": valid.sum().to(n_correct)}
        return LossOutput(terms, metrics)


def chunked_token_loss(
    loss: TokenLoss,
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    tok_w: Tensor,
    extras: dict[str, Tensor],
) -> tuple[dict[str | None, Tensor], Tensor]:
    """Weighted sums of a token loss, computed chunk by chunk with gradients in forward.

    Returns:
        (term key -> ``sum(w * l)``, number of tokens whose argmax equals the target). The
        key is None when :meth:`TokenLoss.token_loss` returns a single tensor.
    """
    keys = list(extras)
    outputs = _ChunkedTokenLoss.apply(
        hidden, weight, bias, targets, tok_w, loss, keys, *extras.values()
    )
    # autograd.Function returns tensors only: the term names travel on the loss object.
    return dict(zip(loss._last_term_keys, outputs[:-1])), outputs[-1]


class _ChunkedTokenLoss(torch.autograd.Function):
    """Forward computes each chunk's loss *and* its gradient; backward only scales them.

    Since the loss is the last operation of the graph, the gradient of a weighted sum with
    respect to hidden states and head is known once the forward is done; computing it chunk
    by chunk in the forward keeps the peak at one chunk of logits, with no recomputation.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tok_w, loss, keys, *extra_values):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        chunk = loss.chunk_size or max(n, 1)
        extras = dict(zip(keys, extra_values))
        sums: dict[str | None, Tensor] = {}
        grads: dict[str | None, list[Tensor | None]] = {}
        n_correct = torch.zeros((), dtype=torch.float32, device=hidden.device)
        acc_dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else None
        starts = range(0, n, chunk) if n > 0 else [0]
        for start in starts:
            end = min(start + chunk, n)
            h = hidden[start:end].detach().requires_grad_(need_h)
            w = weight.detach().requires_grad_(need_w)
            b = bias.detach().requires_grad_(need_b) if bias is not None else None
            with torch.enable_grad():
                logits = F.linear(h, w, b)
                if logits.dtype in (torch.float16, torch.bfloat16):
                    logits = logits.float()
                per_token = loss.token_loss(
                    logits, targets[start:end], {k: v[start:end] for k, v in extras.items()}
                )
                if not isinstance(per_token, dict):
                    per_token = {None: per_token}
                chunk_sums = {k: (v * tok_w[start:end].to(v)).sum() for k, v in per_token.items()}
            with torch.no_grad():
                if end > start:
                    n_correct += (logits.argmax(-1) == targets[start:end]).sum()
            wrt = [t for t, need in ((h, need_h), (w, need_w), (b, need_b)) if need]
            last = len(chunk_sums) - 1
            for j, (key, value) in enumerate(chunk_sums.items()):
                sums[key] = sums.get(key, 0) + value.detach()
                if not wrt or not value.requires_grad:
                    continue
                got = iter(torch.autograd.grad(value, wrt, allow_unused=True, retain_graph=j < last))
                acc = grads.setdefault(key, [None, None, None])
                for i, need in enumerate((need_h, need_w, need_b)):
                    if not need:
                        continue
                    g = next(got)
                    if g is None:
                        continue
                    if i == 0:
                        if acc[0] is None:
                            acc[0] = torch.zeros_like(hidden)
                        acc[0][start:end] = g
                    else:
                        g = g.to(acc_dtype) if acc_dtype is not None else g
                        acc[i] = g if acc[i] is None else acc[i].add_(g)
        term_keys = list(sums)
        loss._last_term_keys = term_keys
        ctx.term_keys = term_keys
        ctx.grads = grads
        ctx.shapes = (hidden, weight, bias)
        ctx.mark_non_differentiable(n_correct)
        return (*[sums[k] for k in term_keys], n_correct)

    @staticmethod
    def backward(ctx, *grad_outputs):
        hidden, weight, bias = ctx.shapes
        out: list[Tensor | None] = [None, None, None]
        for key, g_out in zip(ctx.term_keys, grad_outputs):
            acc = ctx.grads.get(key)
            if acc is None or g_out is None:
                continue
            for i, like in enumerate((hidden, weight, bias)):
                if acc[i] is None:
                    continue
                g = acc[i] * g_out.to(acc[i].dtype)
                out[i] = g if out[i] is None else out[i] + g
        for i, like in enumerate((hidden, weight, bias)):
            if out[i] is not None and like is not None:
                out[i] = out[i].to(like.dtype)
            elif ctx.needs_input_grad[i] and like is not None:
                out[i] = torch.zeros_like(like)
        ctx.grads = None
        return (*out, None, None, None, None, *([None] * (len(ctx.needs_input_grad) - 7)))


def valid_targets(labels: Tensor, ignore_index: int | None = None) -> Tensor:
    """Boolean mask of positions that have a target."""
    valid = labels != IGNORE_INDEX
    if ignore_index is not None and ignore_index != IGNORE_INDEX:
        valid &= labels != ignore_index
    return valid


def sample_ids_from_positions(position_ids: Tensor) -> Tensor:
    """Numbers the samples of each row: a new sample starts wherever the position is 0."""
    return torch.cumsum((position_ids == 0).long(), dim=-1)


def token_weights(
    labels: Tensor,
    reduction: str,
    position_ids: Tensor | None = None,
    loss_weight: Tensor | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """Per-token weights ``[B, S]`` for one reduction mode (0 where there is no target).

    ``token``: ``loss_weight`` (or 1). ``sample``: also ``1 / n_tokens(sample)``. ``square``:
    also ``1 / sqrt(n_tokens(sample))``. Samples are rows, or the documents of a packed row
    (a document starts where ``position_ids`` is 0). Computed on whole sequences, before any
    sequence-parallel split, so every shard weighs a sample the same way.
    """
    valid = valid_targets(labels, ignore_index)
    weights = valid.float()
    if loss_weight is not None:
        weights = weights * loss_weight.float()
    if reduction == "token":
        return weights
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
    if position_ids is None:
        sample_ids = torch.zeros_like(labels)
    else:
        sample_ids = sample_ids_from_positions(position_ids.expand_as(labels))
    # Count valid tokens per (row, sample) with a scatter over a flat index.
    n_per_row = int(sample_ids.max().item()) + 1 if sample_ids.numel() else 1
    flat = sample_ids + torch.arange(labels.shape[0], device=labels.device)[:, None] * n_per_row
    counts = torch.zeros(labels.shape[0] * n_per_row, device=labels.device)
    counts.scatter_add_(0, flat.reshape(-1), valid.float().reshape(-1))
    per_token_count = counts[flat].clamp_min(1.0)
    scale = 1.0 / per_token_count if reduction == "sample" else per_token_count.rsqrt()
    return weights * scale


def compute_weights(
    specs: dict[str, WeightSpec],
    labels: Tensor,
    position_ids: Tensor | None = None,
    loss_weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-token weights for every weight key of a loss (before any sequence-parallel split)."""
    out: dict[str, Tensor] = {}
    for key, spec in specs.items():
        weights = token_weights(labels, spec.reduction, position_ids, loss_weight, spec.ignore_index)
        out[key] = spec.scale(labels, weights) if spec.scale is not None else weights
    return out
