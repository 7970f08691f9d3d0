"""Cross-entropy (the default loss) and its data-weighted variants."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from xtuner.registry import LOSSES

from .backends import BACKENDS, fused_cross_entropy_sum, resolve_backend
from .base import LossContext, LossOutput, TokenLoss, WeightSpec
from .functional import softmax_, target_grad_

#: how the data produces the per-token ``loss_weight`` batch field (for error messages).
LOSS_WEIGHT_SOURCE = (
    "give the records a 'loss_weight' (a number on a conversation turn, next to its "
    "'output', or on the record); process_hf_dataset keeps it and the collate function "
    "adds the per-token 'loss_weight' field to the batch"
)


def cross_entropy_and_grad_(
    logits: Tensor, targets: Tensor, weights: Tensor, label_smoothing: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Per-token cross-entropy and the gradient of ``sum_t w_t l_t``, overwriting ``logits``.

    ``l = (1 - e) * (lse - z_y) + e * (lse - mean_v z_v)`` (PyTorch's label smoothing);
    its gradient is ``p - (1 - e) * onehot(y) - e / V``.

    Returns:
        (``[n]`` losses, ``[n, V]`` gradient, stored in ``logits``).
    """
    z_target = logits.gather(1, targets[:, None]).squeeze(1)
    mean_z = logits.mean(-1) if label_smoothing else None
    lse = softmax_(logits)
    loss = lse - z_target
    if not label_smoothing:
        return loss, target_grad_(logits, targets, weights)
    loss = (1 - label_smoothing) * loss + label_smoothing * (lse - mean_z)
    logits.mul_(weights[:, None])
    logits.scatter_add_(1, targets[:, None], -(1 - label_smoothing) * weights[:, None])
    logits.sub_((label_smoothing / logits.shape[-1]) * weights[:, None])
    return loss, logits


def _head_note(ctx: LossContext) -> str | None:
    """Why the fused kernels cannot compute this model's logits, or None."""
    if ctx.head_weight is None:
        return "with head='model' the logits come from the model, not from a head weight"
    if not ctx.logit_transform.is_identity:
        return f"the model post-processes its logits ({ctx.logit_transform})"
    return None


@LOSSES.register_module()
class CrossEntropyLoss(TokenLoss):
    """Cross-entropy: ``l_t = -log softmax(z_t)[y_t]``.

    With label smoothing ``e``: ``l_t = (1 - e) * (-log p_y) + e * mean_v(-log p_v)``
    (as :func:`torch.nn.functional.cross_entropy`). Unweighted, its value equals the HF
    model's own loss.

    Args:
        label_smoothing: ``e`` in ``[0, 1)``.
        class_weight: one weight per vocabulary id (or None). As in PyTorch's ``'mean'``,
            each token's weight is multiplied by its target's class weight, in the loss and
            in the denominator. Unlike PyTorch, with label smoothing the target's class
            weight scales the whole smoothed loss of the token.
        backend: ``'chunked'`` (this fork's chunked path, every device), ``'liger'`` (Liger
            Kernel), ``'cce'`` (Cut Cross-Entropy) or ``'auto'`` (liger or cce when installed
            and the batch is on a GPU, else chunked); see
            :mod:`xtuner.model.losses.backends`. The kernels do not report accuracy.
        backend_options: keyword arguments for the kernel function of liger or cce.
        **kwargs: ``reduction``, ``ignore_index``, ``chunk_size``, ``name``, ``nonfinite``
            (:class:`~xtuner.model.losses.base.TokenLoss`).
    """

    default_name = "ce"
    logit_rows = 1

    def __init__(
        self,
        label_smoothing: float = 0.0,
        class_weight: Sequence[float] | Tensor | None = None,
        backend: str = "chunked",
        backend_options: dict[str, Any] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"{type(self).__name__}: backend={backend!r} is not one of {BACKENDS}")
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(
                f"{type(self).__name__}: label_smoothing must be in [0, 1), got {label_smoothing}"
            )
        self.label_smoothing = label_smoothing
        if class_weight is not None:
            self.register_buffer(
                "class_weight", torch.as_tensor(class_weight, dtype=torch.float32), persistent=False
            )
        else:
            self.class_weight = None

    @property
    def scales_token_weights(self) -> bool:
        return self.class_weight is not None

    def scale_token_weights(self, labels: Tensor, weights: Tensor) -> Tensor:
        if self.class_weight is None:
            return weights
        safe = labels.clamp_min(0)
        return weights * self.class_weight.to(weights.device)[safe]

    def loss_and_grad(self, logits, targets, extras, weights):
        # Class weights are in the token weights already (scale_token_weights).
        loss, grad = cross_entropy_and_grad_(logits, targets, weights, self.label_smoothing)
        return {self.name: loss}, grad

    @property
    def fusable(self) -> bool:
        return self.backend == "chunked"

    def forward(self, ctx: LossContext) -> LossOutput:
        has_bias = ctx.head_bias is not None
        backend = resolve_backend(
            self.backend, ctx.hidden_states, has_bias, self.label_smoothing, _head_note(ctx)
        )
        if backend == "chunked":
            return super().forward(ctx)
        hidden, targets, tok_w, _, _ = self.valid_tokens(ctx)
        total = fused_cross_entropy_sum(
            backend,
            hidden,
            ctx.head_weight,
            ctx.head_bias,
            targets,
            tok_w,
            self.label_smoothing,
            self.backend_options,
        )
        return self.make_output(ctx, {self.name: total})

    def extra_repr(self) -> str:
        backend = "" if self.backend == "chunked" else f", backend={self.backend!r}"
        return super().extra_repr() + backend


@LOSSES.register_module()
class TokenWeightedCELoss(CrossEntropyLoss):
    """Cross-entropy weighted per token by the data's ``loss_weight`` field, which it requires.

    Every loss multiplies the batch's ``loss_weight`` into its token weights when the batch
    has one. This loss differs in two ways: it *requires* the field (a config that means to
    weight tokens fails loudly when the data lacks the weights, instead of silently training
    unweighted), and it offers the choice of denominator:

    * ``normalize='weight'``: ``sum_t w_t l_t / sum_t w_t`` -- a weighted mean; scaling all
      weights of a batch by a constant changes nothing.
    * ``normalize='tokens'``: ``sum_t w_t l_t / n_tokens`` -- weights scale each token's
      gradient in absolute terms (``w = 0.5`` everywhere halves the step).

    Args:
        normalize: ``'weight'`` or ``'tokens'``.
        **kwargs: see :class:`CrossEntropyLoss`.
    """

    required_fields = {"loss_weight": LOSS_WEIGHT_SOURCE}

    def __init__(self, normalize: str = "weight", **kwargs):
        super().__init__(**kwargs)
        if normalize not in ("weight", "tokens"):
            raise ValueError(
                f"TokenWeightedCELoss: normalize={normalize!r} is not 'weight' or 'tokens'"
            )
        self.normalize = normalize

    def weight_spec(self) -> WeightSpec:
        return replace(super().weight_spec(), use_loss_weight=self.normalize == "weight")

    @property
    def token_weight_key(self) -> str:
        if self.normalize == "weight":
            return self.weight_key
        return f"{self.reduction}@{self.name}:loss_weight"

    def weight_specs(self) -> dict[str, WeightSpec]:
        specs = super().weight_specs()
        if self.normalize == "tokens":
            specs[self.token_weight_key] = replace(self.weight_spec(), use_loss_weight=True)
        return specs


@LOSSES.register_module()
class SampleWeightedCELoss(CrossEntropyLoss):
    """Cross-entropy where every sample (a row, or a packed document) weighs the same.

    ``L = sum_s u_s * mean_{t in s}(l_t) / sum_s u_s`` with ``reduction='sample'``
    (``square``: tokens weighted by ``1 / sqrt(n_s)`` instead of ``1 / n_s``, a middle
    ground between token and sample averaging). The per-sample weight ``u_s`` is the data's
    ``loss_weight`` when every token of a sample carries the same value (a record-level
    ``loss_weight``), else 1.

    Args:
        reduction: ``'sample'`` or ``'square'``.
        **kwargs: see :class:`CrossEntropyLoss`.
    """

    def __init__(self, reduction: str = "sample", **kwargs):
        if reduction not in ("sample", "square"):
            raise ValueError(
                f"SampleWeightedCELoss: reduction={reduction!r}; use 'sample' or 'square' "
                "(CrossEntropyLoss averages over tokens)"
            )
        super().__init__(reduction=reduction, **kwargs)
