"""A loss of your own, in your own module: Poly-1 cross-entropy.

``l_t = CE_t + epsilon * (1 - p_t)`` with ``p_t`` the target's probability (Leng et al.,
"PolyLoss: A Polynomial Expansion Perspective of Classification Loss Functions", ICLR 2022,
arXiv 2204.12511, eq. 3). ``epsilon > 0`` pushes harder on tokens the model finds unlikely.

Only :meth:`token_loss` is written: XTuner computes the logits chunk by chunk from the hidden
states, skips ignored positions, weighs tokens (``reduction``, the data's ``loss_weight``)
and normalises over the whole batch; the gradient comes from autograd on each chunk.

Use it from a config, with this folder on ``PYTHONPATH``::

    custom_imports = dict(imports=["my_losses"], allow_failed_imports=False)
    model = dict(type=SupervisedFinetune, llm=..., loss=dict(type="Poly1Loss", epsilon=1.0))

or without ``custom_imports``: ``loss=dict(type="my_losses.Poly1Loss", epsilon=1.0)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from xtuner.model.losses import TokenLoss
from xtuner.registry import LOSSES


@LOSSES.register_module()
class Poly1Loss(TokenLoss):
    """Poly-1 cross-entropy: ``CE + epsilon * (1 - p_t)``.

    Args:
        epsilon: weight of the first polynomial term.
        **kwargs: ``reduction``, ``ignore_index``, ``chunk_size``, ``name``, ``nonfinite``.
    """

    default_name = "poly1"

    def __init__(self, epsilon: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def token_loss(self, logits: Tensor, targets: Tensor, extras: dict[str, Tensor]) -> Tensor:
        ce = F.cross_entropy(logits, targets, reduction="none")
        return ce + self.epsilon * (1 - (-ce).exp())
