"""The part DPO, ORPO and reward models share: batches of chosen/rejected sequences."""

from __future__ import annotations

from .losses import LossConfigError
from .losses.preference import preference_losses
from .sft import SupervisedFinetune


class PreferenceFinetune(SupervisedFinetune):
    """Supervised fine-tuning on preference pairs with a preference loss.

    Batches hold chosen and rejected answers interleaved (``preference_collate_fn``). The
    preference losses' weights are per-token markers whose sums count the pairs, the
    sequences and the chosen answers' tokens (see :mod:`xtuner.model.losses.preference`),
    so preference terms are normalised per pair over the whole accumulation window and
    every rank, as token losses are per token. Reference-free losses (SimPO, CPO, ORPO)
    also train with a plain :class:`~xtuner.model.sft.SupervisedFinetune`; this class adds
    the check that the loss is a preference loss.

    Args:
        **kwargs: as :class:`~xtuner.model.sft.SupervisedFinetune`; ``loss`` must contain
            at least one preference loss.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not preference_losses(self.loss):
            raise LossConfigError(
                f"{type(self).__name__}: loss {type(self.loss).__name__} is not a preference "
                "loss; use one of DPOLoss, IPOLoss, SimPOLoss, ORPOLoss, ... (docs/en/"
                "preference.md), alone or in a list with other losses"
            )
