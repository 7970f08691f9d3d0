"""Building a loss from a config value, and summing several losses."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any

from mmengine.config import ConfigDict
from mmengine.utils import import_modules_from_strings
from torch import nn

from xtuner.registry import LOSSES

from .base import BaseLoss, LossContext, LossOutput, LossTerm, TokenLoss, WeightSpec


class LossConfigError(ValueError):
    """A ``loss=...`` config value that cannot be built; the message says how to fix it."""


def _resolve_type(loss_type: Any) -> type:
    if isinstance(loss_type, type):
        return loss_type
    if not isinstance(loss_type, str):
        raise LossConfigError(f"loss type must be a class or a string, got {loss_type!r}")
    found = LOSSES.get(loss_type)
    if found is not None:
        return found
    if "." in loss_type:
        module_name, _, attr = loss_type.rpartition(".")
        try:
            module = import_modules_from_strings(module_name)
        except ImportError as exc:
            raise LossConfigError(
                f"loss type {loss_type!r}: cannot import module {module_name!r} ({exc}). "
                "Check the dotted path, or that the module is on PYTHONPATH."
            ) from exc
        if not hasattr(module, attr):
            raise LossConfigError(f"loss type {loss_type!r}: module {module_name!r} has no {attr!r}")
        return getattr(module, attr)
    names = sorted(LOSSES.module_dict)
    close = difflib.get_close_matches(loss_type, names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise LossConfigError(
        f"unknown loss type {loss_type!r}.{hint} Registered losses: {', '.join(names)}. "
        "A loss of your own can be given as a class, a dotted path ('my_pkg.losses.MyLoss') "
        "or registered with @LOSSES.register_module() and loaded by custom_imports."
    )


def build_loss(cfg: Any) -> BaseLoss:
    """Builds a loss from None (cross-entropy), a dict, a module, or a list (a sum).

    Args:
        cfg: ``None``; ``dict(type=..., **kwargs)``; a :class:`BaseLoss` instance; or a list
            of those (each may carry ``loss_weight``) summed by :class:`CompositeLoss`.
    """
    # Importing the package registers every built-in loss.
    from . import CrossEntropyLoss

    if cfg is None:
        return CrossEntropyLoss()
    if isinstance(cfg, nn.Module):
        if not isinstance(cfg, BaseLoss):
            raise LossConfigError(
                f"loss module {type(cfg).__name__} does not derive from "
                "xtuner.model.losses.BaseLoss; write it as a TokenLoss or BaseLoss subclass"
            )
        return cfg
    if isinstance(cfg, (list, tuple)):
        return CompositeLoss(list(cfg))
    if not isinstance(cfg, (dict, ConfigDict)):
        raise LossConfigError(f"loss must be a dict(type=...), a list of them or None, got {cfg!r}")
    cfg = dict(cfg)
    if "type" not in cfg:
        raise LossConfigError(f"loss config {cfg} has no 'type' key; e.g. dict(type='CrossEntropyLoss')")
    cls = _resolve_type(cfg.pop("type"))
    accepted = _accepted_args(cls)
    unknown = [k for k in cfg if k not in accepted]
    if unknown:
        raise LossConfigError(
            f"{cls.__name__}: unknown argument(s) {unknown}. "
            f"It accepts: {', '.join(sorted(accepted))}"
        )
    try:
        loss = cls(**cfg)
    except TypeError as exc:
        raise LossConfigError(f"{cls.__name__}: {exc}") from exc
    if not isinstance(loss, BaseLoss):
        raise LossConfigError(
            f"{cls.__name__} is not a xtuner.model.losses.BaseLoss; derive from TokenLoss "
            "(per-token) or BaseLoss (full loss)"
        )
    return loss


def _accepted_args(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {
            n
            for n, p in params.items()
            if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        }
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break  # this __init__ passes nothing further up
    return names


@LOSSES.register_module()
class CompositeLoss(BaseLoss):
    """A weighted sum of losses, each term logged under its own name.

    Args:
        losses: loss configs or modules. A dict may carry ``loss_weight`` (default 1.0).
        weights: optional weights, one per loss (instead of ``loss_weight`` keys).

    Token losses that read the same weights are fused: their logits are computed once per
    chunk for all of them.
    """

    def __init__(self, losses: Sequence[Any], weights: Sequence[float] | None = None):
        super().__init__(name="composite")
        if not losses:
            raise LossConfigError("CompositeLoss needs at least one loss")
        if weights is not None and len(weights) != len(losses):
            raise LossConfigError(
                f"CompositeLoss: {len(weights)} weights for {len(losses)} losses"
            )
        built, factors = [], []
        for i, cfg in enumerate(losses):
            factor = 1.0 if weights is None else float(weights[i])
            if isinstance(cfg, (dict, ConfigDict)) and "loss_weight" in cfg:
                cfg = dict(cfg)
                factor *= float(cfg.pop("loss_weight"))
            built.append(build_loss(cfg))
            factors.append(factor)
        names = [loss.name for loss in built]
        for i, loss in enumerate(built):
            if names.count(loss.name) > 1:
                loss.name = f"{loss.name}{i}"
        self.losses = nn.ModuleList(built)
        self.factors = factors

    def weight_specs(self) -> dict[str, WeightSpec]:
        specs: dict[str, WeightSpec] = {}
        for loss in self.losses:
            specs.update(loss.weight_specs())
        return specs

    @property
    def required_fields(self) -> dict[str, str]:  # type: ignore[override]
        fields: dict[str, str] = {}
        for loss in self.losses:
            fields.update(loss.required_fields)
        return fields

    def extra_inputs(self, batch, labels):
        extras = {}
        for loss in self.losses:
            extras.update(loss.extra_inputs(batch, labels))
        return extras

    def forward(self, ctx: LossContext) -> LossOutput:
        terms: dict[str, LossTerm] = {}
        metrics = {}
        for group, factors in self._fused_groups():
            out = group(ctx)
            for name, term in out.terms.items():
                factor = factors.get(name, 1.0)
                terms[name] = LossTerm(term.value * factor, term.weight_key, term.denominator)
            if "acc_correct" in out.metrics and "acc_correct" in metrics:
                continue
            metrics.update(out.metrics)
        return LossOutput(terms, metrics)

    def _fused_groups(self):
        """Yields (loss, {term name: factor}); token losses sharing weights run as one."""
        token_groups: dict[tuple, list[int]] = {}
        for i, loss in enumerate(self.losses):
            if type(loss).forward is TokenLoss.forward:
                token_groups.setdefault((loss.weight_key, loss.chunk_size), []).append(i)
        done = set()
        for i, loss in enumerate(self.losses):
            if i in done:
                continue
            members = next((g for g in token_groups.values() if i in g), [i])
            done.update(members)
            if len(members) == 1:
                yield loss, {loss.name: self.factors[i]}
                continue
            fused = _FusedTokenLoss([self.losses[j] for j in members])
            yield fused, {self.losses[j].name: self.factors[j] for j in members}


class _FusedTokenLoss(TokenLoss):
    """Several token losses over one pass of chunked logits."""

    def __init__(self, losses: list[TokenLoss]):
        first = losses[0]
        super().__init__(chunk_size=first.chunk_size, reduction=first.reduction, name="fused")
        self.ignore_index = first.ignore_index
        self.parts = losses
        self._key = first.weight_key

    @property
    def weight_key(self) -> str:
        return self._key

    def token_loss(self, logits, targets, extras):
        out = {}
        for part in self.parts:
            value = part.token_loss(logits, targets, extras)
            if isinstance(value, dict):
                out.update({f"{part.name}_{k}": v for k, v in value.items()})
            else:
                out[part.name] = value
        return out

    def forward(self, ctx: LossContext) -> LossOutput:
        out = super().forward(ctx)
        # Term keys come back as "fused_<part>": drop the prefix.
        terms = {name.split("_", 1)[1]: term for name, term in out.terms.items()}
        return LossOutput(terms, out.metrics)
