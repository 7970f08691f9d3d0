"""Terms added to another loss: z-loss and entropy regularisation."""

from __future__ import annotations

from xtuner.registry import LOSSES

from .base import TokenLoss
from .functional import log_softmax_, row_dot, softmax_


@LOSSES.register_module()
class ZLoss(TokenLoss):
    """Z-loss: ``z_t = logsumexp(z)^2``, which keeps the softmax normaliser near 1.

    Source: Chowdhery et al., "PaLM: Scaling Language Modeling with Pathways", arXiv
    2204.02311, section 5 (weight 1e-4); also ST-MoE (arXiv 2202.08906). A term to add, e.g.
    ``loss=[dict(type='CrossEntropyLoss'), dict(type='ZLoss', loss_weight=1e-4)]``. The
    gradient w.r.t. the logits is ``2 * lse * p``.

    Args:
        **kwargs: ``reduction``, ``ignore_index``, ``chunk_size``, ``name``, ``nonfinite``.
    """

    default_name = "z"
    logit_rows = 1

    def loss_and_grad(self, logits, targets, extras, weights):
        lse = softmax_(logits)
        return {self.name: lse.square()}, logits.mul_((2 * lse * weights)[:, None])


@LOSSES.register_module()
class EntropyRegularization(TokenLoss):
    """Entropy of the predicted distribution as a term: ``r_t = -/+ H(p_t)``.

    ``H(p) = -sum_v p_v log p_v``. ``mode='maximize'`` adds ``-H`` (a confidence penalty:
    Pereyra et al., "Regularizing Neural Networks by Penalizing Confident Output
    Distributions", arXiv 1701.06548); ``mode='minimize'`` adds ``+H`` (entropy minimisation:
    Grandvalet & Bengio, NeurIPS 2004). Weigh it with ``loss_weight`` next to the main
    loss. The gradient of ``H`` w.r.t. the logits is ``-p * (log p + H)``.

    Args:
        mode: ``'maximize'`` or ``'minimize'`` the entropy.
        **kwargs: ``reduction``, ``ignore_index``, ``chunk_size``, ``name``, ``nonfinite``.
    """

    default_name = "entropy"
    logit_rows = 2

    def __init__(self, mode: str = "maximize", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("maximize", "minimize"):
            raise ValueError(
                f"EntropyRegularization: mode={mode!r} is not 'maximize' or 'minimize'"
            )
        self.mode = mode

    def loss_and_grad(self, logits, targets, extras, weights):
        sign = 1.0 if self.mode == "minimize" else -1.0
        log_softmax_(logits)
        probs = logits.exp()
        entropy = -row_dot(probs, logits)
        grad = logits.add_(entropy[:, None]).mul_(probs).mul_((-sign * weights)[:, None])
        return {self.name: sign * entropy}, grad

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mode={self.mode!r}"
