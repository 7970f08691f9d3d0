"""The output head: how a model turns its final hidden states into logits, chunk by chunk.

The chunked losses never call the model's head module on all tokens; they read an
:class:`OutputHead` once per micro-batch and compute ``logits = T(h @ W.T + b)`` a chunk at
a time, where

* ``W`` is the head's *effective* weight: the raw weight, or a tied embedding, or peft's
  ``modules_to_save`` copy, plus every active LoRA adapter's ``scaling * B @ A`` (peft's own
  ``get_delta_weight``), or any differentiable function of the parameters (Baichuan2's
  NormHead: rows normalised). Autograd carries the head gradient back through it.
* ``b`` is the head's bias (or None).
* ``T`` is a :class:`LogitTransform`: a multiplier (Cohere's ``logit_scale``, Granite's
  ``1 / logits_scaling``, MiniCPM's width scaling) then an optional soft cap
  (``cap * tanh(z / cap)``, Gemma2/3's ``final_logit_softcapping``), with its gradient.

Which head a model has is decided by a *head adapter*: a function ``model -> OutputHead``
registered in :data:`xtuner.registry.HEAD_ADAPTERS` under a model class name, the head
module's class name, or a config ``model_type`` (looked up in that order; ``'default'``
otherwise). A user registers one for a model of their own::

    from xtuner.model.losses.head import linear_head
    from xtuner.registry import HEAD_ADAPTERS

    @HEAD_ADAPTERS.register_module(name="MyModelForCausalLM")
    def my_head(model):
        return linear_head(model, scale=0.5)

The model checks once at build that these logits equal its own (see
:func:`check_head_equivalence`).

The hidden states reach the head batch first (``[B, S, H]``, transformers' layout). A
backbone that returns them sequence first (ChatGLM2/3's remote code: ``[S, B, H]``) is
turned by :meth:`OutputHead.batch_first` when its adapter gives a :class:`HiddenLayout`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xtuner.parallel.zero import is_partitioned
from xtuner.registry import HEAD_ADAPTERS

from .functional import scratch

HEAD_MODES = ("chunked", "model")


class HeadMismatchError(ValueError):
    """The chunked head's logits differ from the model's own (raised at build)."""


@dataclass(frozen=True)
class LogitTransform:
    """Post-processing of the raw logits ``z = h @ W.T + b``: ``cap * tanh(scale * z / cap)``.

    Attributes:
        scale: multiplies the raw logits (1.0: none).
        softcap: the soft cap (None: none).
    """

    scale: float = 1.0
    softcap: float | None = None

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, logits: Tensor) -> Tensor:
        """Out of place and differentiable (for full losses, teachers and the probe)."""
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def apply_(self, logits: Tensor, key: str = "head.tanh") -> Tensor | None:
        """Transforms a chunk in place; returns what :meth:`grad_` needs (or None), kept in
        the scratch buffer ``key``."""
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is None:
            return None
        # tanh(z / cap) is kept (one scratch chunk): its square gives the gradient.
        saved = torch.div(logits, self.softcap, out=scratch(key, logits)).tanh_()
        logits.copy_(saved).mul_(self.softcap)
        return saved

    def grad_(self, grad: Tensor, saved: Tensor | None) -> Tensor:
        """Turns the gradient w.r.t. the transformed logits into that w.r.t. the raw ones."""
        if saved is not None:
            grad.mul_(saved.square_().neg_().add_(1.0))
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad


class HiddenLayout:
    """Whether a backbone returns its hidden states batch first (``[B, S, H]``) or sequence
    first (``[S, B, H]``), learned from the first output whose shape tells (``B != S``).

    ChatGLM2/3's remote code is sequence first and GLM-4's batch first, under one
    ``model_type``; what the backbone returns is the one thing that says which. The build-time
    probe (one row of several tokens) settles it before training; under ZeRO-3, where the
    probe cannot run, the first batch does.
    """

    def __init__(self) -> None:
        self.sequence_first: bool | None = None

    def __call__(self, hidden: Tensor, batch: int, seq: int) -> Tensor:
        lead = tuple(hidden.shape[:2])
        if batch != seq:
            if lead not in ((batch, seq), (seq, batch)):
                raise ValueError(
                    f"the backbone returned hidden states of shape {tuple(hidden.shape)} for "
                    f"{batch} rows of {seq} tokens: neither [B, S, H] nor [S, B, H]"
                )
            self.sequence_first = lead == (seq, batch)
        elif self.sequence_first is None:
            raise ValueError(
                f"cannot tell whether the backbone's hidden states {tuple(hidden.shape)} are "
                f"[B, S, H] or [S, B, H]: the first batch has as many rows as tokens ({batch}) "
                "and the build-time probe did not run (ZeRO-3). Use a batch size other than "
                "the sequence length, or loss=dict(..., head='model')."
            )
        return hidden.transpose(0, 1) if self.sequence_first else hidden


#: one layout per model (the adapter is called for every micro-batch).
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, HiddenLayout] = weakref.WeakKeyDictionary()


#: config ``model_type`` values whose (remote-code) backbone may return sequence-first states.
SEQUENCE_FIRST_MODEL_TYPES = ("chatglm",)


def hidden_layout(model: nn.Module) -> HiddenLayout:
    """The :class:`HiddenLayout` of ``model``'s backbone, kept for the model's lifetime."""
    layout = _LAYOUTS.get(model)
    if layout is None:
        layout = _LAYOUTS[model] = HiddenLayout()
    return layout


def backbone_layout(model: nn.Module) -> HiddenLayout | None:
    """The :class:`HiddenLayout` of a model whose backbone may be sequence first (ChatGLM2/3),
    or None for a batch-first one (transformers' layout): for heads other than the language
    model's (a reward model's value head) that read the same hidden states."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return hidden_layout(model) if model_type in SEQUENCE_FIRST_MODEL_TYPES else None


@dataclass
class OutputHead:
    """One model's output head, as the chunked losses compute it.

    Attributes:
        module: the module holding the head's parameters (after unwrapping peft).
        weight_fn: returns the effective weight ``[V, D]`` (differentiable).
        bias_fn: returns the bias ``[V]`` or None.
        transform: the logits' post-processing.
        adapter: the name of the adapter that made this head (for messages).
        layout: how the backbone lays out its hidden states (None: batch first, always).
    """

    module: nn.Module
    weight_fn: Callable[[], Tensor]
    bias_fn: Callable[[], Tensor | None]
    transform: LogitTransform = LogitTransform()
    adapter: str = "default"
    layout: HiddenLayout | None = None

    def batch_first(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        """The backbone's final hidden states ``hidden`` as ``[B, S, H]``, for inputs whose
        first two dimensions are ``tokens``' (``[B, S]``: ids or positions)."""
        if self.layout is None:
            return hidden
        return self.layout(hidden, *tokens.shape[:2])

    @contextlib.contextmanager
    def materialized(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        """``(weight, bias)`` for one loss pass: the one place the head's weight is read.

        Everything the losses compute from the head happens inside this block, so a wrapper
        that must gather a partitioned weight (DeepSpeed ZeRO-3) replaces this method.
        """
        yield self.weight_fn(), self.bias_fn()

    @property
    def vocab_size(self) -> int:
        weight = _raw_weight(self.module)
        shape = getattr(weight, "ds_shape", None) or weight.shape
        return int(shape[0])

    def logits(self, hidden: Tensor) -> Tensor:
        """Full logits ``[..., V]`` of ``hidden`` (all at once: for the probe and tests)."""
        with self.materialized() as (weight, bias):
            return self.transform(F.linear(hidden.to(weight.dtype), weight, bias))

    __call__ = logits


def resolve_head(module: nn.Module) -> nn.Module:
    """The module holding the output head's weight (unwraps peft's ``modules_to_save``)."""
    if hasattr(module, "modules_to_save") and hasattr(module, "active_adapter"):
        active = module.active_adapter
        active = active[0] if isinstance(active, (list, tuple)) else active
        if active in module.modules_to_save:
            return module.modules_to_save[active]
        return module.original_module
    return module


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "get_delta_weight")


def _raw_weight(module: nn.Module) -> Tensor:
    return module.get_base_layer().weight if _is_lora(module) else module.weight


def _active_lora(module: nn.Module) -> list[str]:
    if not _is_lora(module) or module.disable_adapters or module.merged:
        return []
    return [name for name in module.active_adapters if name in module.lora_A]


def _check_lora_head(module: nn.Module, name: str) -> None:
    """LoRA on the head is folded into its weight: only a plain, dropout-free adapter is."""
    for adapter in _active_lora(module):
        dropout = module.lora_dropout[adapter]
        p = getattr(dropout, "p", 0.0)
        dora = bool(getattr(module, "use_dora", {}).get(adapter, False))
        if p or dora:
            what = f"lora_dropout={p}" if p else "use_dora=True"
            raise ValueError(
                f"LoRA adapter {adapter!r} on the output head {name!r} has {what}: the chunked "
                "loss folds the adapter into the head's weight (W + scaling * B @ A), which "
                f"cannot reproduce {what}. Set lora_dropout=0 / use_dora=False, leave the head "
                "out of target_modules, or set loss=dict(..., head='model') to use the model's "
                "own logits (exact, not memory-saving)."
            )


def effective_weight(module: nn.Module) -> Tensor:
    """The head's weight as its forward uses it: base weight plus active LoRA deltas."""
    weight = _raw_weight(module)
    for adapter in _active_lora(module):
        weight = weight + module.get_delta_weight(adapter).to(weight.dtype)
    return weight


def linear_head(
    model: nn.Module,
    scale: float = 1.0,
    softcap: float | None = None,
    normalize: bool = False,
    adapter: str = "default",
    module: nn.Module | None = None,
    layout: HiddenLayout | None = None,
) -> OutputHead:
    """The head of a model whose logits are ``T(h @ W.T + b)`` with its output embeddings.

    Args:
        model: the causal LM (under no peft wrapper; its layers may be peft layers).
        scale: multiplier of the raw logits.
        softcap: soft cap of the scaled logits, or None.
        normalize: use ``W / ||W||_row`` (Baichuan2's NormHead) instead of ``W``.
        adapter: the adapter's name, for messages.
        module: the head's linear layer, where ``get_output_embeddings()`` does not return
            it (ChatGLM's ``transformer.output_layer``).
        layout: the backbone's :class:`HiddenLayout` if it may be sequence first.
    """
    module = resolve_head(model.get_output_embeddings() if module is None else module)
    _check_lora_head(module, type(module).__name__)
    base = module.get_base_layer() if _is_lora(module) else module

    def weight_fn() -> Tensor:
        weight = effective_weight(module)
        return F.normalize(weight, dim=-1) if normalize else weight

    return OutputHead(
        module=module,
        weight_fn=weight_fn,
        bias_fn=lambda: getattr(base, "bias", None),
        transform=LogitTransform(float(scale), None if softcap is None else float(softcap)),
        adapter=adapter,
        layout=layout,
    )


def head_mode(cfg_head: str | None) -> str:
    """Validates a loss config's ``head`` option (``'chunked'``, the default, or ``'model'``)."""
    mode = cfg_head or "chunked"
    if mode not in HEAD_MODES:
        raise ValueError(
            f"loss head={cfg_head!r} is not one of {HEAD_MODES}: 'chunked' computes logits "
            "chunk by chunk from the hidden states (memory-saving), 'model' takes the model's "
            "own logits (exact for any model, the whole [tokens x vocab] tensor at once)"
        )
    return mode


def adapter_keys(model: nn.Module) -> list[str]:
    """The keys a head adapter is looked up by, most specific first."""
    keys = [klass.__name__ for klass in type(model).__mro__ if klass is not object]
    head = model.get_output_embeddings()
    if head is not None:
        keys.append(type(resolve_head(head)).__name__)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type:
        keys.append(model_type)
    return keys


def build_output_head(model: nn.Module) -> OutputHead:
    """The :class:`OutputHead` of a causal LM, from the first matching registered adapter."""
    for key in adapter_keys(model):
        adapter = HEAD_ADAPTERS.module_dict.get(key)
        if adapter is not None:
            return adapter(model)
    if model.get_output_embeddings() is None:
        raise ValueError(
            f"{type(model).__name__} has no output head (get_output_embeddings() is None) and "
            "no head adapter is registered for it: register one in "
            "xtuner.registry.HEAD_ADAPTERS, or set loss=dict(..., head='model') to use the "
            "model's own logits"
        )
    return HEAD_ADAPTERS.module_dict["default"](model)


def check_head_equivalence(
    model_name: str, adapter: str, theirs: Tensor, ours: Tensor, dtype: torch.dtype
) -> None:
    """Raises :class:`HeadMismatchError` when the chunked head's logits differ from the
    model's own beyond the rounding of ``dtype``.

    Args:
        model_name: the model's class name (for the message).
        adapter: the head adapter used.
        theirs: the model's own logits; ``ours``: the chunked head's, same shape.
        dtype: the head's dtype (its rounding sets the tolerance).
    """
    rtol = {torch.float32: 1e-4, torch.float64: 1e-7}.get(dtype, 2e-2)
    problem = None
    if theirs.shape != ours.shape:
        problem = f"logits of shape {tuple(ours.shape)} instead of {tuple(theirs.shape)}"
    else:
        theirs, ours = theirs.double(), ours.double()
        scale = float(theirs.abs().max()) if theirs.numel() else 0.0
        diff = float((theirs - ours).abs().max()) if theirs.numel() else 0.0
        if not diff <= rtol * max(scale, 1.0):
            problem = (
                f"a largest logit difference of {diff:.3g} (logits up to {scale:.3g}; "
                f"tolerance {rtol:g} relative in {dtype})"
            )
    if problem is None:
        return
    raise HeadMismatchError(
        f"{model_name}: the chunked loss's output head (adapter {adapter!r}: weight, bias and "
        f"logit post-processing as registered) gives {problem} compared with the model's own "
        "forward on a probe of a few tokens, so the loss would be silently wrong. Either "
        "register a head adapter for this model (a function model -> OutputHead in "
        f"xtuner.registry.HEAD_ADAPTERS under the name {model_name!r}; see "
        "docs/en/supported_models.md), or set loss=dict(..., head='model') to take the "
        "model's own logits (exact for any model, but the whole [tokens x vocab] tensor "
        "exists at once)."
    )


def values_elsewhere(tensor: Tensor) -> bool:
    """Whether a parameter's values are not on this process (ZeRO-3 shard or meta)."""
    return is_partitioned(tensor) or tensor.is_meta or tensor.numel() == 0


# Built-in adapters --------------------------------------------------------------------------
@HEAD_ADAPTERS.register_module(name="default")
def default_head(model: nn.Module) -> OutputHead:
    """``h @ W.T + b`` with the model's output embeddings (Llama, Qwen2/3, Mistral, Phi3,
    Gemma, Mixtral, Qwen-MoE, InternLM2, ...)."""
    return linear_head(model)


@HEAD_ADAPTERS.register_module(name=["gemma2", "gemma3_text", "gemma3"])
def softcapped_head(model: nn.Module) -> OutputHead:
    """Gemma2/3: ``cap * tanh(z / cap)`` with ``config.final_logit_softcapping`` (if set)."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    return linear_head(model, softcap=cap, adapter="softcap")


@HEAD_ADAPTERS.register_module(name=["cohere", "cohere2"])
def cohere_head(model: nn.Module) -> OutputHead:
    """Cohere: ``z * config.logit_scale``."""
    return linear_head(model, scale=model.config.logit_scale, adapter="cohere")


@HEAD_ADAPTERS.register_module(name=["granite", "granitemoe", "granitemoeshared"])
def granite_head(model: nn.Module) -> OutputHead:
    """Granite: ``z / config.logits_scaling``."""
    return linear_head(model, scale=1.0 / model.config.logits_scaling, adapter="granite")


@HEAD_ADAPTERS.register_module(name="minicpm")
def minicpm_head(model: nn.Module) -> OutputHead:
    """MiniCPM (remote code): the head sees ``h / (hidden_size / dim_model_base)``."""
    config = model.config
    return linear_head(model, scale=config.dim_model_base / config.hidden_size, adapter="minicpm")


@HEAD_ADAPTERS.register_module(name="NormHead")
def norm_head(model: nn.Module) -> OutputHead:
    """Baichuan2's ``NormHead`` (remote code): logits with the rows of ``W`` normalised."""
    return linear_head(model, normalize=True, adapter="NormHead")


@HEAD_ADAPTERS.register_module(name="chatglm")
def chatglm_head(model: nn.Module) -> OutputHead:
    """ChatGLM2/3 and GLM-4 (remote code, ``model_type='chatglm'``): the head is
    ``transformer.output_layer`` (``get_output_embeddings()`` is None), and ChatGLM2/3's
    backbone returns sequence-first hidden states (GLM-4's are batch first)."""
    layer = getattr(getattr(model, "transformer", None), "output_layer", None)
    if layer is None:
        raise ValueError(
            f"{type(model).__name__} has model_type 'chatglm' but no transformer.output_layer "
            "(the ChatGLM head adapter reads it): register a head adapter for this model, or "
            "set loss=dict(..., head='model') to use the model's own logits"
        )
    return linear_head(model, adapter="chatglm", module=layer, layout=hidden_layout(model))
