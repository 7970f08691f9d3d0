"""Saves the trained model in HF format when training ends."""

from __future__ import annotations

import os.path as osp

from mmengine.dist import is_main_process
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from xtuner.parallel.zero import is_partitioned


@HOOKS.register_module()
class HFCheckpointHook(Hook):
    """Saves the model with ``to_hf`` after training, in fp32.

    Under ZeRO-3 it runs on every rank: the weights are gathered from all of them and rank 0
    writes. A weight that is not whole stops the run with an error instead of being saved.

    Args:
        out_dir: where to save (default ``<work_dir>/hf_model``).
    """

    priority = "VERY_LOW"

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir

    def after_run(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        out_dir = self.out_dir or osp.join(runner.work_dir, "hf_model")
        # ZeRO-3 weights are gathered from every rank (to_hf writes on rank 0 only then);
        # otherwise rank 0 alone saves.
        if is_main_process() or any(is_partitioned(p) for p in model.parameters()):
            model.to_hf(runner.cfg, out_dir, fp32=True)
        if is_main_process():
            print_log(f"saved the HF-format model to {out_dir}", "current")
