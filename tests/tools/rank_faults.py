"""Faults on one rank at one iteration, for tests/tools/test_train_launch.py, whose configs
import them (this folder is on the training processes' ``PYTHONPATH``):

- :class:`NaNOnOneRankLoss`: cross-entropy whose value is NaN on one rank at one iteration
  (its gradient stays finite, as the loss's ``nonfinite`` policy must decide alone);
- :class:`HangOnOneRank`: a hook that makes one rank sleep before one iteration, so that the
  other ranks wait for it in a collective.
"""

from __future__ import annotations

import time

from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.logging import MessageHub

from xtuner.model.losses import CrossEntropyLoss


class NaNOnOneRankLoss(CrossEntropyLoss):
    """Cross-entropy, NaN on rank ``rank`` at iteration ``iteration`` (counted from 0)."""

    def __init__(self, rank: int = 1, iteration: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.rank, self.iteration = rank, iteration

    def loss_and_grad(self, logits, targets, extras, weights):
        values, grad = super().loss_and_grad(logits, targets, extras, weights)
        if get_rank() == self.rank and MessageHub.get_current_instance().get_info("iter") == (
            self.iteration
        ):
            values = {name: value * float("nan") for name, value in values.items()}
        return values, grad


class HangOnOneRank(Hook):
    """Rank ``rank`` sleeps an hour before iteration ``iteration`` (counted from 0)."""

    def __init__(self, rank: int = 1, iteration: int = 2):
        self.rank, self.iteration = rank, iteration

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if get_rank() == self.rank and runner.iter == self.iteration:
            time.sleep(3600)
