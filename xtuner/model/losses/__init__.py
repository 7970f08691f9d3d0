"""Losses: the contract (:mod:`.base`), the builder and the built-in library.

Every loss here is registered in :data:`xtuner.registry.LOSSES`, so configs can name it:
``model=dict(type=SupervisedFinetune, ..., loss=dict(type='CrossEntropyLoss'))``.
"""

from .base import (
    BaseLoss,
    LossContext,
    LossInputError,
    LossOutput,
    LossTerm,
    TokenLoss,
    WeightSpec,
    compute_weights,
    token_weights,
)
from .builder import CompositeLoss, LossConfigError, build_loss
from .cross_entropy import CrossEntropyLoss, SampleWeightedCELoss, TokenWeightedCELoss
from .dft import DFTLoss
from .distill import KDLoss
from .focal import FocalLoss
from .head import HeadMismatchError, LogitTransform, OutputHead, build_output_head
from .normalize import finalize_loss
from .preference import DPO_LOSS_TYPES, REWARD_LOSS_TYPES, PreferenceLoss, chunked_target_logps
from .regularizers import EntropyRegularization, ZLoss
from .router import RouterAuxLoss, RouterZLoss

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
    "LossInputError",
    "CrossEntropyLoss",
    "TokenWeightedCELoss",
    "SampleWeightedCELoss",
    "FocalLoss",
    "DFTLoss",
    "ZLoss",
    "EntropyRegularization",
    "KDLoss",
    "PreferenceLoss",
    "DPO_LOSS_TYPES",
    "REWARD_LOSS_TYPES",
    "chunked_target_logps",
    "RouterAuxLoss",
    "RouterZLoss",
    "OutputHead",
    "LogitTransform",
    "HeadMismatchError",
    "build_output_head",
]
