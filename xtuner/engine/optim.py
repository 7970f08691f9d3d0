"""Optimizer wrappers: mmengine's DeepSpeed wrapper, plus the gradient norm in the log."""

from __future__ import annotations

from mmengine._strategy.deepspeed import DeepSpeedOptimWrapper as _MMDeepSpeedOptimWrapper
from mmengine.logging import MessageHub
from mmengine.registry import OPTIM_WRAPPERS


@OPTIM_WRAPPERS.register_module()
class DeepSpeedGradNormOptimWrapper(_MMDeepSpeedOptimWrapper):
    """mmengine's ``DeepSpeedOptimWrapper`` that also logs ``grad_norm``.

    mmengine's ``OptimWrapper`` logs the gradient norm it clips with; under DeepSpeed the
    engine computes that norm (over every partition, before clipping) and mmengine's wrapper
    drops it, so a DeepSpeed run could not show a vanishing or exploding gradient. It is
    logged once per optimizer step, at the end of each accumulation window.
    """

    def step(self, **kwargs) -> None:
        boundary = self.model.is_gradient_accumulation_boundary()
        self.model.step()
        if not boundary:
            return
        norm = self.model.get_global_grad_norm()
        if norm is not None:
            MessageHub.get_current_instance().update_scalar("train/grad_norm", float(norm))
