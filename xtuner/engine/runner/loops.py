"""TrainLoop: iteration-based training that knows the tokens of each accumulation window.

The normalisation rule (docs/en/sequence_parallel.md, "Loss normalisation"): the gradient
of one optimizer step is the gradient of ``sum(w*l) / sum(w)`` over every valid token of
every micro-batch of the accumulation window on every rank. Before the first micro-batch of
a window the loop fetches the whole window, asks the model for each micro-batch's
token-weight sums (``model.loss_denominators``), all-reduces them, and hands every
micro-batch the effective denominator ``D_global / (ranks averaged over x optim-wrapper
divisor)`` as ``data['loss_denominator']``. Data-parallel averaging and the wrapper's
accumulation scaling then turn each micro-batch's ``sum(w*l) / denominator`` into exactly
that gradient.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

import torch
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import LOOPS
from mmengine.runner import IterBasedTrainLoop
from torch.utils.data import DataLoader

from xtuner.model.losses.normalize import SKIPPED_KEY
from xtuner.parallel.comm import all_reduce_sum, token_weighted_mean, world_size
from xtuner.parallel.sequence import get_sequence_parallel_world_size

NORMALIZATIONS = ("global", "micro_batch")


class _EpochIterator:
    """Endless iteration over a dataloader, calling ``set_epoch`` on restarts (no sleep)."""

    def __init__(self, dataloader: DataLoader):
        self.dataloader = dataloader
        self.epoch = 0
        self._iterator = iter(dataloader)

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        try:
            return next(self._iterator)
        except StopIteration:
            self.epoch += 1
            for holder in (
                self.dataloader.sampler,
                getattr(self.dataloader, "batch_sampler", None),
            ):
                if hasattr(holder, "set_epoch"):
                    holder.set_epoch(self.epoch)
                    break
            self._iterator = iter(self.dataloader)
            return next(self._iterator)


@LOOPS.register_module()
class TrainLoop(IterBasedTrainLoop):
    """Iteration-based loop with XTuner's arguments and global loss normalisation.

    Args:
        runner: the mmengine runner.
        dataloader: a dataloader or its config.
        max_iters: total iterations; or
        max_epochs: total epochs (may be fractional). Exactly one of the two.
        loss_normalization: ``'global'`` (default; the rule above) or ``'micro_batch'``
            (each micro-batch's own token mean, as upstream XTuner: identical curves).
        max_nonfinite_skips: with a loss's ``nonfinite='skip'``, stop once more than this
            many iterations skipped a NaN/Inf term (None: never). Every rank skips the same
            iterations, so every rank stops at the same one.
        **kwargs: ``val_begin``, ``val_interval``, ``dynamic_intervals``.
    """

    def __init__(
        self,
        runner,
        dataloader,
        max_iters: int | None = None,
        max_epochs: int | float | None = None,
        loss_normalization: str = "global",
        max_nonfinite_skips: int | None = None,
        **kwargs,
    ):
        if (max_iters is None) == (max_epochs is None):
            raise ValueError(
                "TrainLoop: give exactly one of max_iters and max_epochs "
                f"(got max_iters={max_iters}, max_epochs={max_epochs})"
            )
        if loss_normalization not in NORMALIZATIONS:
            raise ValueError(
                f"TrainLoop: loss_normalization={loss_normalization!r}; use one of {NORMALIZATIONS}"
            )
        # Building the loop draws nothing from the global generator (each iter() of a
        # DataLoader draws its base seed): mmengine's Runner builds the model before the loop
        # and FlexibleRunner (DeepSpeed) after it, so the model's random initialisation (LoRA's
        # A matrices) would otherwise differ between the two for the same seed.
        with torch.random.fork_rng(devices=[]):
            if isinstance(dataloader, dict):
                diff_rank_seed = runner._randomness_cfg.get("diff_rank_seed", False)
                dataloader = runner.build_dataloader(
                    dataloader, seed=runner.seed, diff_rank_seed=diff_rank_seed
                )
            if max_epochs is not None:
                if len(dataloader) == 0:
                    raise ValueError("TrainLoop: the training dataloader is empty")
                max_iters = max(1, int(math.ceil(max_epochs * len(dataloader))))
                print_log(
                    f"TrainLoop: {max_epochs} epoch(s) of {len(dataloader)} iterations "
                    f"= {max_iters} iterations",
                    logger="current",
                )
            super().__init__(runner, dataloader, max_iters=int(max_iters), **kwargs)
            self.dataloader_iterator = _EpochIterator(self.dataloader)
        self.loss_normalization = loss_normalization
        self.max_nonfinite_skips = max_nonfinite_skips
        self.nonfinite_skips = 0
        self._window: deque = deque()

    @property
    def epoch(self) -> int:
        return self.dataloader_iterator.epoch

    def run(self):
        self.runner.call_hook("before_train")
        self.runner.call_hook("before_train_epoch")
        if self._iter > 0:
            print_log(
                f"Advance dataloader {self._iter} steps to skip data already trained on", "current"
            )
            for _ in range(self._iter):
                next(self.dataloader_iterator)
        while self._iter < self._max_iters and not self.stop_training:
            self.runner.model.train()
            self.run_iter(self._next_batch())
            self._decide_current_val_interval()
            if (
                self.runner.val_loop is not None
                and self._iter >= self.val_begin
                and (self._iter % self.val_interval == 0 or self._iter == self._max_iters)
            ):
                self.runner.val_loop.run()
        self.runner.call_hook("after_train_epoch")
        self.runner.call_hook("after_train")
        return self.runner.model

    def run_iter(self, data_batch) -> None:
        """One iteration; the logged values are those of the whole global batch."""
        self.runner.call_hook("before_train_iter", batch_idx=self._iter, data_batch=data_batch)
        outputs = self.runner.model.train_step(data_batch, optim_wrapper=self.runner.optim_wrapper)
        self._count_nonfinite_skip(outputs)
        outputs = token_weighted_mean(outputs, get_sequence_parallel_world_size())
        self.runner.call_hook(
            "after_train_iter", batch_idx=self._iter, data_batch=data_batch, outputs=outputs
        )
        self._iter += 1

    def _count_nonfinite_skip(self, outputs: dict) -> None:
        if not outputs.pop(SKIPPED_KEY, None):
            return
        self.nonfinite_skips += 1
        limit = self.max_nonfinite_skips
        if limit is not None and self.nonfinite_skips > limit:
            raise FloatingPointError(
                f"TrainLoop: {self.nonfinite_skips} iterations skipped a NaN/Inf loss term (the "
                f"last: iteration {self._iter + 1}), more than train_cfg.max_nonfinite_skips="
                f"{limit}. Check the data and the learning rate (the warnings above name each "
                "term and rank)."
            )

    # global normalisation ------------------------------------------------------------------
    def _next_batch(self):
        if not self._window:
            self._fill_window()
        return self._window.popleft()

    def _fill_window(self) -> None:
        accumulate, divisor = self._accumulation()
        remaining = self._max_iters - self._iter
        size = min(accumulate - self._iter % accumulate, remaining) if accumulate > 1 else 1
        batches = [next(self.dataloader_iterator) for _ in range(max(size, 1))]
        model = (
            self.runner.model.module if is_model_wrapper(self.runner.model) else self.runner.model
        )
        if self.loss_normalization == "global" and hasattr(model, "loss_denominators"):
            attach_loss_denominators(model, batches, divisor)
        self._window.extend(batches)

    def _accumulation(self) -> tuple[int, int]:
        """(micro-batches per optimizer step, the divisor the wrapper scales the loss by)."""
        wrapper = self.runner.optim_wrapper
        engine = getattr(wrapper, "model", None)
        if engine is not None and hasattr(engine, "gradient_accumulation_steps"):
            steps = int(engine.gradient_accumulation_steps())  # DeepSpeed divides by gas
            return steps, steps
        wrappers = getattr(wrapper, "optim_wrappers", None)
        if wrappers:
            wrapper = next(iter(wrappers.values()))
        accumulate = int(getattr(wrapper, "_accumulative_counts", 1))
        if accumulate == 1:
            return 1, 1
        # As OptimWrapper.scale_loss: the last, short window is divided by its own length.
        inner = getattr(wrapper, "_inner_count", self._iter)
        max_counts = getattr(wrapper, "_max_counts", -1)
        remainder = getattr(wrapper, "_remainder_counts", 0)
        if max_counts > 0 and remainder > 0 and inner >= max_counts - remainder:
            return accumulate, remainder
        return accumulate, accumulate


def attach_loss_denominators(model, batches: list, divisor: int) -> None:
    """Hands every micro-batch of one accumulation window its ``loss_denominator``.

    The token-weight sums of the window (``model.loss_denominators``), all-reduced over the
    ranks, divided by the ranks and by ``divisor`` (what the optimizer step divides the loss
    by: the accumulation steps of this window), so that data-parallel averaging and the
    accumulation scaling give the gradient of the global token mean (the module docstring).
    Used by :class:`TrainLoop` and by the HF Trainer path (``xtuner/tools/train_hf.py``).

    Args:
        model: the model (unwrapped), with ``loss_denominators(data)``.
        batches: the collated micro-batches (``{"data": ...}`` or the bare data dict).
        divisor: the divisor of the accumulated loss.
    """
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        data = batch.get("data", batch)
        for key, value in model.loss_denominators(data).items():
            sums[key] = sums.get(key, 0) + value.double().cpu()
    keys = sorted(sums)
    if not keys:
        return
    stacked = torch.stack([sums[k] for k in keys])
    device = _comm_device()
    stacked = all_reduce_sum(stacked.to(device)).cpu()
    # The ranks of one sequence-parallel group hold the same sequences: count them once.
    stacked = stacked / get_sequence_parallel_world_size()
    # A window without any target anywhere: every loss sum is 0, keep its gradient 0.
    stacked = torch.where(stacked > 0, stacked, torch.ones_like(stacked))
    scale = world_size() * divisor
    denominators = {k: (stacked[i] / scale).float() for i, k in enumerate(keys)}
    for batch in batches:
        data = batch.get("data", batch)
        data["loss_denominator"] = {k: v.clone() for k, v in denominators.items()}


def _comm_device() -> torch.device:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
