"""Logs tokens per second per device and model TFLOPs per device."""

from __future__ import annotations

import time

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS


@HOOKS.register_module()
class ThroughputHook(Hook):
    """Throughput in the training log (``tokens_per_sec``, ``tflops``).

    FLOPs per token follow the usual dense-transformer count: ``6 x parameters`` for the
    matrix work (x 4/3 with activation checkpointing, which reruns the forward) plus
    ``12 x layers x hidden x sequence`` for causal attention (halved for causal masks). The
    shape arguments default to the model's own config.
    """

    priority = "BELOW_NORMAL"

    def __init__(
        self,
        use_activation_checkpointing: bool | None = None,
        hidden_size: int | None = None,
        num_layers: int | None = None,
        vocab_size: int | None = None,
        mlp_ratio: float | None = None,
        is_casual: bool | None = None,
    ):
        self.use_activation_checkpointing = use_activation_checkpointing
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.vocab_size = vocab_size
        self.mlp_ratio = mlp_ratio
        self.is_causal = True if is_casual is None else is_casual
        self._start = None

    def before_run(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        config = getattr(getattr(model, "llm", model), "config", None)
        self.hidden_size = self.hidden_size or getattr(config, "hidden_size", 0)
        self.num_layers = self.num_layers or getattr(config, "num_hidden_layers", 0)
        self.vocab_size = self.vocab_size or getattr(config, "vocab_size", 0)
        if self.mlp_ratio is None and config is not None and self.hidden_size:
            self.mlp_ratio = (
                getattr(config, "intermediate_size", 4 * self.hidden_size) / self.hidden_size
            )
        if self.use_activation_checkpointing is None:
            self.use_activation_checkpointing = bool(
                getattr(model, "use_activation_checkpointing", False)
            )

    def flops_per_token(self, seq_len: int) -> float:
        h, layers, v, r = self.hidden_size, self.num_layers, self.vocab_size, self.mlp_ratio or 4
        # attention projections 4h^2 + gated MLP 3*r*h^2 per layer, plus the output head
        params = layers * (4 * h * h + 3 * r * h * h) + v * h
        attn = 2 * layers * h * seq_len * (0.5 if self.is_causal else 1.0)
        factor = 4 if self.use_activation_checkpointing else 3  # fwd + 2x bwd (+ recompute)
        return 2 * factor * (params + attn)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._start = time.perf_counter()

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self._start is None or data_batch is None:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        data = data_batch.get("data", data_batch)
        ids = data.get("input_ids")
        if ids is None:
            return
        mask = data.get("attention_mask")
        tokens = int(mask.sum()) if mask is not None else ids.numel()
        seq_len = ids.shape[-1]
        runner.message_hub.update_scalar("train/tokens_per_sec", tokens / elapsed)
        tflops = self.flops_per_token(seq_len) * tokens / elapsed / 1e12
        runner.message_hub.update_scalar("train/tflops", tflops)
