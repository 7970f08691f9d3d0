"""Focal loss: cross-entropy that down-weights tokens the model already predicts well."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from xtuner.registry import LOSSES

from .base import TokenLoss
from .functional import softmax_, target_grad_


@LOSSES.register_module()
class FocalLoss(TokenLoss):
    """Focal loss: ``l_t = -alpha_{y_t} * (1 - p_t)^gamma * log p_t`` with ``p_t = p(y_t)``.

    Source: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017 (arXiv
    1708.02002), eq. 5, applied to next-token prediction. ``gamma = 0`` and no ``alpha`` is
    cross-entropy. ``alpha`` scales the loss only; the denominator stays the token count.

    Args:
        gamma: focusing parameter ``>= 0``.
        alpha: None (1), one float for every class, or one weight per vocabulary id.
        **kwargs: ``reduction``, ``ignore_index``, ``chunk_size``, ``name``, ``nonfinite``.
    """

    default_name = "focal"
    logit_rows = 1

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | Tensor | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if gamma < 0:
            raise ValueError(f"FocalLoss: gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        if alpha is None or isinstance(alpha, (int, float)):
            self.alpha = None if alpha is None else float(alpha)
        else:
            self.register_buffer(
                "alpha", torch.as_tensor(alpha, dtype=torch.float32), persistent=False
            )

    def _alpha(self, targets: Tensor, like: Tensor) -> Tensor | float:
        if isinstance(self.alpha, Tensor):
            return self.alpha.to(like)[targets]
        return 1.0 if self.alpha is None else self.alpha

    def loss_and_grad(self, logits, targets, extras, weights):
        log_pt = logits.gather(1, targets[:, None]).squeeze(1)
        log_pt = log_pt - softmax_(logits)
        pt = log_pt.exp()
        one_minus = -torch.expm1(log_pt)  # 1 - p_t, accurate near p_t = 1
        focus = one_minus.pow(self.gamma)
        alpha = self._alpha(targets, logits)
        loss = -alpha * focus * log_pt
        # d l / d z = s * (p - onehot(y)) with s = (1-p)^g - g (1-p)^(g-1) p log p; the
        # second part tends to 0 as p -> 1 (guarded: 0^(g-1) is inf for g < 1).
        scale = focus
        if self.gamma:
            inner = self.gamma * one_minus.pow(self.gamma - 1) * pt * log_pt
            scale = focus - torch.where(one_minus > 0, inner, torch.zeros_like(inner))
        return {self.name: loss}, target_grad_(logits, targets, alpha * scale * weights)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"
