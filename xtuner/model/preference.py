"""The part DPO, ORPO and reward models share: batches of chosen/rejected sequences."""

from __future__ import annotations

from torch import Tensor

from .losses import LossConfigError
from .losses.preference import preference_losses, preference_weights, sequence_index
from .sft import SupervisedFinetune


class PreferenceFinetune(SupervisedFinetune):
    """Supervised fine-tuning on preference pairs with a preference loss.

    Batches hold chosen and rejected answers interleaved (``preference_collate_fn``). Next
    to the loss's own token weights, the targets get the per-token markers whose sums
    count the pairs, the sequences and the chosen answers' tokens (see
    :mod:`xtuner.model.losses.preference`), so preference terms are normalised per pair
    over the whole accumulation window and every rank, as token losses are per token.

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

    def _targets(self, data: dict, position_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        labels, weights = super()._targets(data, position_ids)
        seq, n_seqs = sequence_index(position_ids, labels.shape)
        weights.update(preference_weights(labels, seq.to(labels.device), n_seqs))
        return labels, weights
