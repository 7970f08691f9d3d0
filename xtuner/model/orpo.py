"""ORPO as a model: the policy alone (no reference), with the odds-ratio loss."""

from __future__ import annotations

from typing import Any

from .preference import PreferenceFinetune


class ORPO(PreferenceFinetune):
    """ORPO (Hong et al., arXiv 2403.07691) with XTuner 0.x's arguments.

    The loss is :class:`~xtuner.model.losses.preference.ORPOLoss`: the chosen answers' NLL
    plus ``beta`` x the odds-ratio term, logged as ``loss_nll`` and ``loss_or``; ``loss``
    replaces it with any other (list of) loss(es).

    Args:
        llm: the model (or its config dict).
        beta: the odds-ratio term's weight.
        loss: a loss config overriding ``beta``'s ORPO loss.
        **kwargs: :class:`~xtuner.model.sft.SupervisedFinetune`'s.
    """

    def __init__(self, llm: Any, beta: float = 0.1, loss: Any = None, **kwargs):
        if loss is None:
            loss = dict(type="ORPOLoss", beta=beta)
        super().__init__(llm, loss=loss, **kwargs)
        self.beta = beta
