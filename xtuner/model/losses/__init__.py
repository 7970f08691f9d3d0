"""Losses: the contract (:mod:`.base`), the builder and the built-in library.

Every loss here is registered in :data:`xtuner.registry.LOSSES`, so configs can name it:
``model=dict(type=SupervisedFinetune, ..., loss=dict(type='CrossEntropyLoss'))``.
"""

from .base import (
    BaseLoss,
    LossContext,
    LossOutput,
    LossTerm,
    TokenLoss,
    WeightSpec,
    compute_weights,
    token_weights,
)
from .builder import CompositeLoss, LossConfigError, build_loss
from .cross_entropy import CrossEntropyLoss
from .normalize import finalize_loss

__all__ = [
    "BaseLoss",
    "TokenLoss",
    "LossContext",
    "LossOutput",
    "LossTerm",
    "WeightSpec",
    "compute_weights",
    "token_weights",
    "build_loss",
    "finalize_loss",
    "CompositeLoss",
    "LossConfigError",
    "CrossEntropyLoss",
]
