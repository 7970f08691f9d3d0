"""Cross-entropy, the default loss (equal to the HF model's own loss when unweighted)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from xtuner.registry import LOSSES

from .base import TokenLoss


@LOSSES.register_module()
class CrossEntropyLoss(TokenLoss):
    """``l_t = -log softmax(z_t)[y_t]`` with optional label smoothing and class weights.

    Args:
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
        class_weight: one weight per vocabulary id (or None). As in PyTorch's ``'mean'``,
            each token's weight is multiplied by its target's class weight, in the loss and
            in the denominator.
        **kwargs: ``reduction``, ``ignore_index``, ``chunk_size``, ``name``
            (:class:`~xtuner.model.losses.base.TokenLoss`).
    """

    default_name = "ce"

    def __init__(
        self,
        label_smoothing: float = 0.0,
        class_weight: Sequence[float] | Tensor | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1), got {label_smoothing}")
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

    def token_loss(self, logits: Tensor, targets: Tensor, extras: dict[str, Tensor]) -> Tensor:
        # Class weights are in the token weights already (scale_token_weights).
        return F.cross_entropy(
            logits, targets, reduction="none", label_smoothing=self.label_smoothing
        )
