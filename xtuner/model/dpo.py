"""DPO and its variants as a model: a policy, a reference, and a preference loss."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from mmengine.config import ConfigDict
from mmengine.logging import print_log
from torch import Tensor, nn

from .losses import LossConfigError, OutputHead, build_output_head
from .losses.preference import (
    DPO_LOSS_TYPES,
    REF_FIELD,
    answer_index,
    preference_losses,
    sequence_logps,
)
from .preference import PreferenceFinetune
from .sft import SupervisedFinetune, shift_labels


def dpo_loss_config(
    loss_type: str | Sequence[str],
    beta: float,
    label_smoothing: float,
    loss_weights: Sequence[float] | None = None,
    rpo_alpha: float | None = None,
) -> dict | list:
    """The loss config for XTuner 0.x's (and TRL's) ``loss_type`` arguments.

    A list of types is a weighted sum (MPO: e.g. ``['sigmoid', 'bco_pair']``);
    ``rpo_alpha`` adds the chosen answers' NLL with that weight (RPO).
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    unknown = [t for t in types if t not in DPO_LOSS_TYPES]
    if unknown:
        raise LossConfigError(
            f"DPO: loss_type {unknown} is not one of {sorted(DPO_LOSS_TYPES)}; or give "
            "loss=dict(type=...) for any registered loss"
        )
    if loss_weights is not None and len(loss_weights) != len(types):
        raise LossConfigError(f"DPO: {len(loss_weights)} loss_weights for {len(types)} loss types")
    losses = []
    for i, name in enumerate(types):
        cfg: dict[str, Any] = dict(type=DPO_LOSS_TYPES[name], beta=beta)
        if name in ("sigmoid", "robust", "exo_pair", "aot", "aot_pair"):
            cfg["label_smoothing"] = label_smoothing
        if name == "aot_pair":
            cfg["paired"] = True
        if len(types) > 1:
            cfg["name"] = f"dpo_{name}"
            cfg["loss_weight"] = 1.0 if loss_weights is None else float(loss_weights[i])
        losses.append(cfg)
    if rpo_alpha:
        losses.append(dict(type="ChosenNLLLoss", loss_weight=float(rpo_alpha)))
    return losses[0] if len(losses) == 1 else losses


class DPO(PreferenceFinetune):
    """Direct preference optimisation and its variants, with XTuner 0.x's arguments.

    The loss is ``loss`` when given (any registered loss or a list of them, e.g. SimPO, or
    MPO as ``[dict(type='DPOLoss'), dict(type='BCOPairLoss', loss_weight=0.5),
    dict(type='ChosenNLLLoss', loss_weight=1.0)]``); else it is made from ``loss_type``,
    ``beta`` and ``label_smoothing`` (:data:`~xtuner.model.losses.preference.DPO_LOSS_TYPES`).

    The reference model, when the loss needs one:

    * ``ref_llm`` given (a model or its config): that model, frozen;
    * else under LoRA: the policy itself with its adapter disabled (no extra memory);
    * else a frozen copy of the initial policy (one more model's weights).

    The reference is not a submodule: it is not trained, not in ``state_dict()`` and not in
    checkpoints, but follows ``.to()``/``.cuda()``/``.half()`` of the model. Its
    log-probabilities are computed under ``no_grad`` on the whole batch (before any
    sequence-parallel split), chunk by chunk from its hidden states, and handed to the loss
    as the batch field ``ref_logps``. With ``precompute_ref_log_probs=True`` they come from
    a cache filled in one pass over the data before training
    (:class:`~xtuner.engine.hooks.PrecomputeRefLogpsHook`), saving the reference forward of
    every step.

    Args:
        llm: the policy (model or config dict).
        ref_llm: the reference (model or config dict), or None (see above).
        beta: the DPO temperature.
        loss_type: an XTuner 0.x / TRL loss type, or a list of them (a weighted sum).
        label_smoothing: for ``sigmoid``, ``robust``, ``exo_pair``, ``aot``.
        loss_weights: weights of a list of loss types.
        rpo_alpha: adds ``rpo_alpha`` x the chosen answers' NLL (RPO).
        precompute_ref_log_probs: read the reference's log-probabilities from the cache.
        loss: a loss config, overriding the four arguments above.
        **kwargs: :class:`~xtuner.model.sft.SupervisedFinetune`'s (``lora``,
            ``use_varlen_attn``, ``tokenizer``, ...).
    """

    def __init__(
        self,
        llm: Any,
        ref_llm: Any = None,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        label_smoothing: float = 0.0,
        loss_weights: Sequence[float] | None = None,
        rpo_alpha: float | None = None,
        precompute_ref_log_probs: bool = False,
        loss: Any = None,
        **kwargs,
    ):
        if loss is None:
            loss = dpo_loss_config(loss_type, beta, label_smoothing, loss_weights, rpo_alpha)
        super().__init__(llm, loss=loss, **kwargs)
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.needs_reference = any(p.needs_reference for p in preference_losses(self.loss))
        self.precompute_ref_log_probs = precompute_ref_log_probs
        #: sequence digest -> reference log-probability (filled by PrecomputeRefLogpsHook).
        self.ref_cache: dict[bytes, float] = {}
        self._warned_empty_cache = False
        ref = None
        if self.needs_reference and (ref_llm is not None or not self.use_lora):
            ref = self._build_reference(ref_llm, kwargs)
        # Outside nn.Module's registry: not trained, not saved, not seen by DDP/DeepSpeed.
        object.__setattr__(self, "ref_llm", ref)

    def _build_reference(self, ref_llm: Any, kwargs: dict) -> nn.Module:
        if ref_llm is None:
            from transformers.integrations import is_deepspeed_zero3_enabled

            if is_deepspeed_zero3_enabled():
                raise ValueError(
                    "DPO: DeepSpeed ZeRO-3 partitions the policy, so it cannot be copied as the "
                    "reference: give model.ref_llm=dict(type=AutoModelForCausalLM."
                    "from_pretrained, ...) in the config, or use LoRA"
                )
            ref = copy.deepcopy(self.llm)
        elif isinstance(ref_llm, nn.Module):
            ref = ref_llm
        elif isinstance(ref_llm, (dict, ConfigDict)):
            ref = SupervisedFinetune._build_llm(ref_llm, kwargs.get("max_position_embeddings"))
        else:
            raise TypeError(f"DPO: ref_llm must be a model or a config dict, got {ref_llm!r}")
        ref.config.use_cache = False
        return ref.eval().requires_grad_(False)

    def _apply(self, fn, recurse=True):
        # Device and dtype moves reach the reference although it is not a submodule.
        if self.__dict__.get("ref_llm") is not None:
            self.ref_llm._apply(fn)
        return super()._apply(fn, recurse)

    @contextlib.contextmanager
    def reference(self) -> Iterator[tuple[nn.Module, OutputHead]]:
        """(backbone, output head) of the reference model, for the duration of the block."""
        if self.ref_llm is not None:
            ref = self.ref_llm
            backbone = getattr(ref, ref.base_model_prefix, None) or ref.get_decoder()
            yield backbone, build_output_head(ref)
            return
        if not self.use_lora:
            raise RuntimeError(
                "DPO: a batch's reference log-probabilities are not in the precomputed cache, "
                "and the reference model was released after precomputing; the training data "
                "must be the data the cache was computed on"
            )
        with self.llm.disable_adapter():
            yield self.backbone(), self.output_head()

    @torch.no_grad()
    def reference_logps(self, data: dict) -> Tensor:
        """The reference's summed target log-probability of every sequence of the batch."""
        inputs = self._attention_inputs(data)
        labels = shift_labels(data["labels"], inputs["position_ids"])
        seq, n_seqs = answer_index(labels)
        chunk = max((p.chunk_size for p in preference_losses(self.loss)), default=256)
        with self.reference() as (backbone, head):
            hidden = backbone(**inputs, use_cache=False).last_hidden_state
            hidden = head.batch_first(hidden, inputs["position_ids"])
            with head.materialized() as (weight, bias):
                sums, _, _ = sequence_logps(
                    hidden, weight, bias, labels, seq, n_seqs, chunk, head.transform
                )
        return sums.detach()

    def loss_batch(self, data: dict) -> dict:
        """The batch with what the loss reads besides the model's inputs: the reference's
        log-probabilities (``ref_logps``), from the cache or computed now."""
        if not self.needs_reference or data.get(REF_FIELD) is not None:
            return data
        data = dict(data)
        cached = self._cached_reference(data) if self.precompute_ref_log_probs else None
        data[REF_FIELD] = cached if cached is not None else self.reference_logps(data)
        return data

    def compute_loss(self, data: dict) -> dict[str, Tensor]:
        if "labels" not in data:
            raise KeyError("the batch has no 'labels': the dataset must produce them")
        return super().compute_loss(self.loss_batch(data))

    # precomputed reference log-probabilities -----------------------------------------------
    def _cached_reference(self, data: dict) -> Tensor | None:
        from xtuner.engine.hooks.preference import sequence_digests

        if not self.ref_cache and not self._warned_empty_cache:
            self._warned_empty_cache = True
            print_log(
                "DPO(precompute_ref_log_probs=True): the reference cache is empty, so the "
                "reference runs every step; add dict(type=PrecomputeRefLogpsHook) to "
                "custom_hooks to compute it once before training",
                logger="current",
                level=logging.WARNING,
            )
        keys = sequence_digests(data)
        if not all(key in self.ref_cache for key in keys):
            return None
        values = [self.ref_cache[key] for key in keys]
        return torch.tensor(values, dtype=torch.float32, device=data["labels"].device)

    def cache_reference(self, data: dict) -> None:
        """Computes the batch's reference log-probabilities into :attr:`ref_cache`."""
        from xtuner.engine.hooks.preference import sequence_digests

        values = self.reference_logps(data).tolist()
        self.ref_cache.update(zip(sequence_digests(data), values))

    def release_reference(self) -> None:
        """Drops the reference model once every sequence's values are cached."""
        object.__setattr__(self, "ref_llm", None)
