"""SupervisedFinetune: builds the language model (full, LoRA or QLoRA) and runs its loss."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Any

import torch
from mmengine.config import Config, ConfigDict
from mmengine.dist import is_main_process
from mmengine.logging import MessageHub, print_log
from mmengine.model import BaseModel
from torch import Tensor, nn

from xtuner.parallel.sequence import get_sequence_parallel_world_size
from xtuner.parallel.zero import (
    check_whole,
    consolidated_state_dict,
    full_shape,
    is_partitioned,
    register_external_parameters,
)
from xtuner.registry import BUILDER
from xtuner.utils.constants import IGNORE_INDEX

from .losses import (
    CompositeLoss,
    LossContext,
    OutputHead,
    build_loss,
    build_output_head,
    compute_weights,
    finalize_loss,
)
from .losses.head import LogitTransform, check_head_equivalence, head_mode, values_elsewhere
from .losses.router import (
    RouterAuxLoss,
    check_router_model,
    has_router_loss,
    router_outputs,
    wants_router_logits,
)
from .modules.packed_attention import (
    check_trainable_attention,
    packed_flash_kwargs,
    probe_attention,
)
from .utils import LoadWoInit, build_nested, find_all_linear_names, prepare_llm_config

#: tokens the build-time head probe runs through the model (cheap; no gradient).
PROBE_TOKENS = 4

#: batch fields that only the loss reads (never passed to the language model).
LOSS_ONLY_FIELDS = ("labels", "loss_weight", "loss_denominator", "cumulative_len", "max_seqlen")


def shift_labels(labels: Tensor, position_ids: Tensor | None = None) -> Tensor:
    """Next-token targets: ``out[:, t] = labels[:, t + 1]``, ignored at the end.

    When ``position_ids`` restart at 0 (a new packed document), the last token of the previous
    document gets no target: documents never predict each other.
    """
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        starts = position_ids.expand_as(labels)[:, 1:] == 0
        shifted[:, :-1] = shifted[:, :-1].masked_fill(starts, IGNORE_INDEX)
    return shifted


def shift_tokens(values: Tensor) -> Tensor:
    """Shifts a per-token tensor like the labels (``out[:, t] = values[:, t + 1]``)."""
    out = torch.zeros_like(values)
    out[:, :-1] = values[:, 1:]
    return out


class SupervisedFinetune(BaseModel):
    """Supervised fine-tuning of a causal language model, with a pluggable loss.

    Args:
        llm: the model, or a config dict (e.g. ``dict(type=AutoModelForCausalLM.from_pretrained,
            pretrained_model_name_or_path=..., dtype=torch.bfloat16)``; ``torch_dtype`` is
            accepted too; a ``quantization_config=dict(type=BitsAndBytesConfig, ...)`` gives
            QLoRA).
        lora: a ``LoraConfig`` or its config dict; ``target_modules=None`` targets every
            Linear but the output head.
        peft_model: path of a trained adapter to start from.
        use_activation_checkpointing: recompute activations in backward to save memory.
        use_varlen_attn: packed documents attend only within themselves.
        tokenizer: when given, embeddings are resized to its length (padded to a multiple
            of 64, new rows mean-initialised).
        max_position_embeddings: extend the context with linear RoPE scaling.
        loss: the loss config (see :func:`xtuner.model.losses.build_loss`); None is
            cross-entropy equal to the HF model's own loss. A dict (or every dict of a list)
            may carry ``head='model'``: the loss then reads the model's own logits instead of
            computing them chunk by chunk (exact for any model; not memory-saving).

    At build the output head the chunked loss uses (:mod:`xtuner.model.losses.head`) is
    checked against the model's own forward on a few tokens; a difference fails the build.
    MoE models whose config sets ``output_router_logits=True`` get the router's
    load-balancing loss as the term ``loss_router_aux`` (:mod:`xtuner.model.losses.router`).
    """

    def __init__(
        self,
        llm: Any,
        lora: Any = None,
        peft_model: str | None = None,
        use_activation_checkpointing: bool = True,
        use_varlen_attn: bool = False,
        tokenizer: Any = None,
        max_position_embeddings: int | None = None,
        loss: Any = None,
    ):
        super().__init__()
        self.llm = self._build_llm(llm, max_position_embeddings)
        self.llm.config.use_cache = False
        if tokenizer is not None:
            self._resize_embeddings(tokenizer)
        self.use_activation_checkpointing = use_activation_checkpointing
        self.use_varlen_attn = use_varlen_attn
        self.use_lora = lora is not None or peft_model is not None
        if self.use_lora:
            self._prepare_lora(lora, peft_model, use_activation_checkpointing)
        if use_activation_checkpointing:
            self.gradient_checkpointing_enable()
        loss, self.head_mode = _pop_head_option(loss)
        self.loss = self._with_router_loss(build_loss(loss))
        if self.head_mode == "chunked":
            self._probe_head()
        if use_varlen_attn:
            self._probe_packing()

    # building ------------------------------------------------------------------------------
    @staticmethod
    def _build_llm(llm: Any, max_position_embeddings: int | None) -> nn.Module:
        if isinstance(llm, nn.Module):
            return llm
        if not isinstance(llm, (dict, ConfigDict)):
            raise TypeError(f"llm must be a model or a config dict, got {type(llm).__name__}")
        cfg = prepare_llm_config(llm, max_position_embeddings)
        path = cfg.get("pretrained_model_name_or_path")
        if path is not None and not os.path.exists(str(path)) and os.environ.get("HF_HUB_OFFLINE"):
            raise FileNotFoundError(
                f"llm.pretrained_model_name_or_path={path!r} does not exist on this machine "
                "(and the model hub is offline): give a local model folder"
            )
        with LoadWoInit():
            return build_nested(cfg)

    def _resize_embeddings(self, tokenizer: Any) -> None:
        if isinstance(tokenizer, (dict, ConfigDict)):
            tokenizer = BUILDER.build(tokenizer)
        current = full_shape(self.llm.get_input_embeddings().weight)[0]
        if len(tokenizer) > current:
            self.llm.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
            print_log(
                f"resized token embeddings from {current} to "
                f"{full_shape(self.llm.get_input_embeddings().weight)[0]}",
                logger="current",
            )

    def _prepare_lora(self, lora: Any, peft_model: str | None, checkpointing: bool) -> None:
        from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

        quantized = getattr(self.llm, "is_loaded_in_4bit", False) or getattr(
            self.llm, "is_loaded_in_8bit", False
        )
        if quantized:
            self.llm = prepare_model_for_kbit_training(
                self.llm, use_gradient_checkpointing=checkpointing
            )
        if peft_model is not None:
            self.llm = PeftModel.from_pretrained(self.llm, peft_model, is_trainable=True)
            return
        if isinstance(lora, (dict, ConfigDict)):
            lora = BUILDER.build(lora)
        if getattr(lora, "target_modules", None) is None:
            lora.target_modules = find_all_linear_names(self.llm)
        self.llm = get_peft_model(self.llm, lora)

    def _with_router_loss(self, loss: nn.Module) -> nn.Module:
        """Adds the MoE load-balancing loss the model's own loss has (``output_router_logits``)
        unless the loss config names a router loss; asks the model for router logits when
        it does."""
        base = self.base_llm
        if has_router_loss(loss):
            check_router_model(base)
            base.config.output_router_logits = True
            return loss
        if not wants_router_logits(base):
            return loss
        check_router_model(base)
        return CompositeLoss([loss, RouterAuxLoss()])

    @torch.no_grad()
    def _probe_head(self) -> None:
        """Checks once that the chunked head reproduces the model's own logits.

        A few tokens go through the model's forward and through the backbone plus
        :meth:`output_head`, in eval mode (no dropout), without gradients. Skipped when the
        head's weight is not on this process (ZeRO-3 partitions, meta tensors).
        """
        head = self.output_head()
        params = list(head.module.parameters())
        if not params or any(values_elsewhere(p) for p in params):
            return
        ids, positions = self._probe_tokens(PROBE_TOKENS)
        with _eval_mode(self.llm), probe_attention(self.base_llm):
            theirs = self.causal_lm()(input_ids=ids, position_ids=positions, use_cache=False)
            theirs = theirs.logits
            hidden = self.backbone()(input_ids=ids, position_ids=positions, use_cache=False)
            ours = head.logits(head.batch_first(hidden.last_hidden_state, ids))
        dtype = params[0].dtype
        check_head_equivalence(type(self.base_llm).__name__, head.adapter, theirs, ours, dtype)

    def _probe_tokens(self, n: int) -> tuple[Tensor, Tensor]:
        """``[1, n]`` token ids and positions for a build-time probe."""
        embedding = self.causal_lm().get_input_embeddings()
        device = embedding.weight.device
        ids = (torch.arange(1, n + 1, device=device) % embedding.weight.shape[0])[None]
        return ids, torch.arange(n, device=device)[None]

    @torch.no_grad()
    def _probe_packing(self) -> None:
        """With ``use_varlen_attn``, checks once that packed documents do not attend each
        other: the second of two packed documents (positions restarting at 0, no mask) must
        give the logits it gives alone. Remote-code models whose attention ignores
        ``position_ids`` fail here instead of training on leaked context."""
        if any(values_elsewhere(p) for p in self.base_llm.get_input_embeddings().parameters()):
            return
        ids, positions = self._probe_tokens(2 * PROBE_TOKENS)
        packed_positions = (positions % PROBE_TOKENS).clone()
        with _eval_mode(self.llm), probe_attention(self.base_llm):
            packed = self.llm(input_ids=ids, position_ids=packed_positions, use_cache=False)
            alone = self.llm(
                input_ids=ids[:, PROBE_TOKENS:],
                position_ids=positions[:, :PROBE_TOKENS],
                use_cache=False,
            )
        theirs, ours = alone.logits.double(), packed.logits[:, PROBE_TOKENS:].double()
        diff = float((theirs - ours).abs().max())
        rtol = 1e-4 if self.base_llm.dtype == torch.float32 else 2e-2
        if diff <= rtol * max(float(theirs.abs().max()), 1.0):
            return
        raise ValueError(
            f"use_varlen_attn=True, but {type(self.base_llm).__name__} with attn_implementation="
            f"{self.base_llm.config._attn_implementation!r} lets packed documents attend each "
            f"other: a document packed after another gives logits up to {diff:.3g} away from "
            "the same document alone (its attention does not follow position_ids that restart "
            "at 0). Use a model whose attention goes through transformers' attention and "
            "masking functions, or set use_varlen_attn=False and pack_to_max_length=False so "
            "that every row holds one document."
        )

    def init_weights(self) -> None:
        """Weights come from the pretrained model: mmengine must not re-initialise them.

        mmengine's ``BaseModule.init_weights`` also takes ``param.mean()`` of every parameter
        for its log, which fails on the uint8/int8 storage of 4-bit and 8-bit quantised
        weights (QLoRA).
        """

    def gradient_checkpointing_enable(self) -> None:
        kwargs = {"use_reentrant": False}
        if hasattr(self.base_llm, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.base_llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if self.use_lora:
            self.llm.enable_input_require_grads()

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.base_llm, "activation_checkpointing_disable"):
            self.base_llm.activation_checkpointing_disable()
        else:
            self.llm.gradient_checkpointing_disable()

    # parts of the language model ------------------------------------------------------------
    @property
    def base_llm(self) -> nn.Module:
        """The HF CausalLM under any peft wrapper."""
        return self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm

    def causal_lm(self) -> nn.Module:
        """The model that maps token ids or embeddings to logits (the base LLM; a
        vision-language model whose language model is one of its parts returns that)."""
        return self.base_llm

    def backbone(self) -> nn.Module:
        """The decoder that returns final hidden states (the CausalLM minus its head)."""
        base = self.causal_lm()
        return getattr(base, base.base_model_prefix, None) or base.get_decoder()

    def _attention_model(self) -> nn.Module:
        """The model whose attention sequence parallel wraps (the whole LLM here)."""
        return self.base_llm

    def output_head(self) -> OutputHead:
        """How the chunked loss computes this model's logits (the registered head adapter)."""
        return build_output_head(self.causal_lm())

    # forward -------------------------------------------------------------------------------
    def forward(self, data: dict, data_samples=None, mode: str = "loss"):
        if mode == "loss":
            return self.compute_loss(data)
        if mode == "predict":
            logits = self._llm_forward(data).logits
            return [{"logits": row} for row in logits]
        if mode == "tensor":
            return self._llm_forward(data)
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")

    def _llm_forward(self, data: dict):
        inputs = {k: v for k, v in data.items() if k not in LOSS_ONLY_FIELDS}
        return self.llm(**inputs)

    def _attention_inputs(self, data: dict) -> dict[str, Tensor | None]:
        """input_ids/position_ids/attention_mask; the mask is dropped when it is all ones.

        Without a mask, transformers builds the causal mask itself, and with position_ids
        restarting at 0 it keeps packed documents apart (varlen attention).
        """
        mask = data.get("attention_mask")
        if mask is not None and (self.use_varlen_attn or bool(mask.all())):
            mask = None
        position_ids = data.get("position_ids")
        if position_ids is None:
            position_ids = torch.arange(data["input_ids"].shape[1], device=data["input_ids"].device)
            position_ids = position_ids.unsqueeze(0).expand_as(data["input_ids"])
        return {
            "input_ids": data["input_ids"],
            "position_ids": position_ids,
            "attention_mask": mask,
        }

    def compute_loss(self, data: dict) -> dict[str, Tensor]:
        """Shift, weigh, (split for sequence parallel,) run the backbone, apply the loss."""
        if "labels" not in data:
            raise KeyError("the batch has no 'labels': the dataset must produce them")
        return self.loss_from_inputs(self._attention_inputs(data), data)

    def loss_from_inputs(self, inputs: dict[str, Tensor | None], data: dict) -> dict[str, Tensor]:
        """The loss of the backbone run on ``inputs``, against the targets in ``data``.

        Args:
            inputs: the backbone's inputs (``input_ids`` or ``inputs_embeds``,
                ``position_ids``, ``attention_mask``), ``[B, S, ...]`` each.
            data: the batch: ``labels`` (not shifted), optional ``loss_weight`` and any
                fields the loss reads, aligned with ``inputs`` token for token.

        Returns:
            Named loss terms and metrics (see :func:`~xtuner.model.losses.finalize_loss`).
        """
        check_trainable_attention(self.causal_lm(), inputs)
        labels, weights = self._targets(data, inputs["position_ids"])
        extras = self.loss.extra_inputs(data, labels)
        router_mask = inputs.get("attention_mask")
        if get_sequence_parallel_world_size() > 1:
            from xtuner.parallel.sequence import shard_padding_mask, split_for_sequence_parallel

            from .modules import enable_sequence_parallel_attention

            enable_sequence_parallel_attention(self._attention_model())
            # The router statistics count this shard's real tokens (not the sp padding).
            router_mask = shard_padding_mask(router_mask, *labels.shape[:2], labels.device)
            inputs, labels, weights, extras = split_for_sequence_parallel(
                inputs, labels, weights, extras
            )
        elif self.use_varlen_attn:
            kernel = self.base_llm.config._attn_implementation
            inputs = {**inputs, **packed_flash_kwargs(kernel, inputs["position_ids"])}
        if self.head_mode == "model":
            # The model's own logits, all at once: exact for any head, not memory-saving.
            out = self.causal_lm()(**inputs, use_cache=False)
            hidden, head = out.logits, None
        else:
            out = self.backbone()(**inputs, use_cache=False)
            head = self.output_head()
            hidden = head.batch_first(out.last_hidden_state, inputs["position_ids"])
        router = router_outputs(self.causal_lm(), out, router_mask)
        if head is not None:
            # ZeRO-3 gathers a parameter around the forward (and backward) of the module it
            # is registered with; the loss reads the head's weight outside the head's
            # forward, so it is registered with this model, whose forward contains the loss.
            register_external_parameters(self, list(head.module.parameters()))
        with _materialized(head) as (weight, bias):
            ctx = LossContext(
                hidden_states=hidden,
                head_weight=weight,
                head_bias=bias,
                labels=labels,
                weights=weights,
                extras=extras,
                batch=data,
                iteration=_current_iteration(),
                logit_transform=head.transform if head is not None else LogitTransform(),
                router=router,
            )
            output = self.loss(ctx)
        return finalize_loss(output, weights, data.get("loss_denominator"), self._zero_anchor)

    def _zero_anchor(self) -> Tensor:
        """A zero reaching every trainable parameter directly (replaces a skipped term: all
        parameters get a zero gradient, none passes through non-finite activations)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return torch.zeros((), requires_grad=True)
        return sum(p.reshape(-1)[:1].sum() * 0 for p in params).float()

    def _targets(self, data: dict, position_ids: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Next-token targets and the loss's per-token weights (whole sequences, unsplit)."""
        labels = shift_labels(data["labels"], position_ids)
        loss_weight = data.get("loss_weight")
        if loss_weight is not None:
            loss_weight = shift_tokens(loss_weight)
        weights = compute_weights(self.loss.weight_specs(), labels, position_ids, loss_weight)
        return labels, weights

    def loss_denominators(self, data: dict) -> dict[str, Tensor]:
        """Sum of this batch's token weights per weight key (for global normalisation)."""
        _, weights = self._targets(data, self._attention_inputs(data)["position_ids"])
        return {key: w.sum().double() for key, w in weights.items()}

    # checkpoints ---------------------------------------------------------------------------
    def state_dict(self, *args, **kwargs):
        """Under LoRA only the trainable weights (adapters, ``modules_to_save``), with the
        same key names as the full state dict, so ``load_state_dict(strict=False)`` restores
        them."""
        state = super().state_dict(*args, **kwargs)
        if not self.use_lora:
            return state
        return self._trainable_entries(state, kwargs.get("prefix", ""))

    def _trainable_entries(
        self, state: dict, prefix: str, whole: tuple[str, ...] = ()
    ) -> OrderedDict:
        """The entries of ``state`` that are trainable parameters, and every entry under
        one of the ``whole`` key prefixes (relative to ``prefix``)."""
        trainable = {prefix + name for name, p in self.named_parameters() if p.requires_grad}
        whole = tuple(prefix + w for w in whole)
        return OrderedDict(
            (k, v) for k, v in state.items() if k in trainable or k.startswith(whole)
        )

    def to_hf(
        self,
        cfg: Config | None,
        save_dir: str,
        fp32: bool = False,
        save_pretrained_kwargs: dict | None = None,
        **kwargs,
    ) -> None:
        """Saves the model (or the LoRA adapter) in HF format, with the tokenizer if known.

        Under ZeRO-3 every rank must call it: the weights are gathered module by module and
        rank 0 writes them. It raises rather than write a tensor that is not whole.
        """
        kwargs_ = dict(save_pretrained_kwargs or {})
        state = None
        if any(is_partitioned(p) for p in self.parameters()):
            state = {k.removeprefix("llm."): v for k, v in consolidated_state_dict(self).items()}
        if not is_main_process():
            return
        llm = self.llm
        if state is not None:
            check_whole(state, llm)
            kwargs_["state_dict"] = state
        if not fp32 and not self.use_lora:
            dtype = torch.bfloat16 if _bf16_ok() else torch.float16
            print_log(f"saving the model in {dtype} (pass fp32=True to keep fp32)", "current")
            if state is None:
                llm = llm.to(dtype)
            else:
                kwargs_["state_dict"] = {
                    k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()
                }
        llm.config.use_cache = True
        llm.save_pretrained(save_dir, **kwargs_)
        tokenizer = cfg.get("tokenizer") if cfg is not None else None
        if tokenizer is not None:
            if isinstance(tokenizer, (dict, ConfigDict)):
                tokenizer = BUILDER.build(tokenizer)
            tokenizer.save_pretrained(save_dir)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.llm, name)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Eval mode (no dropout) inside the block; every submodule's own mode restored after."""
    modes = {sub: sub.training for sub in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for sub, mode in modes.items():
            sub.training = mode


@contextlib.contextmanager
def _materialized(head: OutputHead | None):
    """``(weight, bias)`` of the head for one loss pass; ``(None, None)`` for head='model'."""
    if head is None:
        yield None, None
        return
    with head.materialized() as pair:
        yield pair


def _pop_head_option(loss: Any) -> tuple[Any, str]:
    """Takes ``head=...`` out of a loss config (a dict, or each dict of a list)."""
    if isinstance(loss, (dict, ConfigDict)):
        loss = dict(loss)
        return loss, head_mode(loss.pop("head", None))
    if isinstance(loss, (list, tuple)):
        parts, modes = [], set()
        for part in loss:
            if isinstance(part, (dict, ConfigDict)):
                part = dict(part)
                modes.add(head_mode(part.pop("head", None)))
            parts.append(part)
        if len(modes) > 1:
            raise ValueError(
                "the losses of the list give different head options "
                f"({sorted(modes)}): one head serves them all; give head='model' on every "
                "entry or on none"
            )
        return parts, modes.pop() if modes else "chunked"
    return loss, "chunked"


def _bf16_ok() -> bool:
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()


def _current_iteration() -> int | None:
    try:
        return MessageHub.get_current_instance().get_info("iter")
    except Exception:
        return None
