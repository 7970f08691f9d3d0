"""Dynamic Fine-Tuning: cross-entropy weighted by the (stop-gradient) target probability."""

from __future__ import annotations

from xtuner.registry import LOSSES

from .base import TokenLoss
from .functional import softmax_, target_grad_


@LOSSES.register_module()
class DFTLoss(TokenLoss):
    """Dynamic Fine-Tuning (DFT): ``l_t = -sg(p_t) * log p_t`` with ``sg`` = stop-gradient.

    Source: Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective
    with Reward Rectification", arXiv 2508.05629 (2025). Rescaling each token's
    cross-entropy by its own probability cancels the implicit ``1 / p_t`` importance weight
    of the SFT gradient. The gradient w.r.t. the logits is ``p_t * (p - onehot(y))``.

    Args:
        **kwargs: ``reduction``, ``ignore_index``, ``chunk_size``, ``name``, ``nonfinite``.
    """

    default_name = "dft"
    gradient_matches_value = False  # sg(p_t): the gradient is not d(value)
    logit_rows = 1

    def loss_and_grad(self, logits, targets, extras, weights):
        log_pt = logits.gather(1, targets[:, None]).squeeze(1)
        log_pt = log_pt - softmax_(logits)
        pt = log_pt.exp()
        return {self.name: -pt * log_pt}, target_grad_(logits, targets, pt * weights)
