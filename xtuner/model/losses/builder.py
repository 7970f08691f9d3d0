"""Building a loss from a config value, and summing several losses."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from mmengine.config import ConfigDict
from mmengine.utils import import_modules_from_strings
from torch import Tensor, nn

from xtuner.registry import LOSSES

from .base import BaseLoss, LossContext, LossOutput, LossTerm, TokenLoss, WeightSpec
from .functional import scratch


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
            raise LossConfigError(
                f"loss type {loss_type!r}: module {module_name!r} has no {attr!r}"
            )
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
        raise LossConfigError(
            f"loss config {cfg} has no 'type' key; e.g. dict(type='CrossEntropyLoss')"
        )
    if "loss_weight" in cfg:
        return CompositeLoss([cfg])
    cls = _resolve_type(cfg.pop("type"))
    if not (isinstance(cls, type) and issubclass(cls, BaseLoss)):
        raise LossConfigError(
            f"loss type {cls!r} is not a subclass of xtuner.model.losses.BaseLoss; derive "
            "from TokenLoss (a per-token loss) or BaseLoss (a full loss)"
        )
    accepted = _accepted_args(cls)
    unknown = [k for k in cfg if k not in accepted]
    if unknown:
        close = {k: difflib.get_close_matches(k, sorted(accepted), n=1) for k in unknown}
        hints = "".join(f" Did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c)
        raise LossConfigError(
            f"{cls.__name__}: unknown argument(s) {unknown}.{hints} "
            f"It accepts: {', '.join(sorted(accepted))}"
        )
    try:
        return cls(**cfg)
    except TypeError as exc:
        raise LossConfigError(f"{cls.__name__}: {exc}") from exc


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

    Token losses that read the same weights and chunk size are fused: their logits are
    computed once per chunk for all of them, and their gradients summed before the two
    gradient matmuls.

    Args:
        losses: loss configs or modules. A dict may carry ``loss_weight`` (default 1.0).
        weights: optional weights, one per loss (multiplied with any ``loss_weight``).
        nonfinite: None keeps each loss's own NaN policy; ``'raise'`` or ``'skip'`` sets it
            for all of them.
    """

    def __init__(
        self,
        losses: Sequence[Any],
        weights: Sequence[float] | None = None,
        nonfinite: str | None = None,
    ):
        super().__init__(name="composite", nonfinite=nonfinite or "raise")
        if not losses:
            raise LossConfigError("CompositeLoss needs at least one loss")
        if weights is not None and len(weights) != len(losses):
            raise LossConfigError(f"CompositeLoss: {len(weights)} weights for {len(losses)} losses")
        built, factors = [], []
        for i, cfg in enumerate(losses):
            factor = 1.0 if weights is None else float(weights[i])
            if isinstance(cfg, (dict, ConfigDict)) and "loss_weight" in cfg:
                cfg = dict(cfg)
                factor *= float(cfg.pop("loss_weight"))
            built.append(build_loss(cfg))
            factors.append(factor)
        if nonfinite is not None:
            for loss in built:
                for module in loss.modules():
                    if isinstance(module, BaseLoss):
                        module.nonfinite = nonfinite
        _dedupe_names(built)
        self.losses = nn.ModuleList(built)
        self.factors = factors
        # A plain list: the fused helpers are not submodules (their parts are, above).
        self._plan = _fusion_plan(built, factors)

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

    def term_names(self) -> list[str]:
        return [name for loss in self.losses for name in loss.term_names()]

    def extra_inputs(self, batch: dict[str, Any], labels: Tensor) -> dict[str, Tensor]:
        extras: dict[str, Tensor] = {}
        for loss in self.losses:
            for key, value in loss.extra_inputs(batch, labels).items():
                if key in extras:
                    raise LossConfigError(
                        f"CompositeLoss: two losses produce the extra input {key!r}; give "
                        "them different names"
                    )
                extras[key] = value
        return extras

    def forward(self, ctx: LossContext) -> LossOutput:
        terms: dict[str, LossTerm] = {}
        metrics: dict[str, Tensor] = {}
        for loss, factor in self._plan:
            out = loss(ctx)
            for name, term in out.terms.items():
                if name in terms:
                    raise LossConfigError(
                        f"CompositeLoss: two losses return a term named {name!r}; set name=... "
                        "on one of them"
                    )
                terms[name] = term if factor == 1.0 else replace(term, value=term.value * factor)
            for key, value in out.metrics.items():
                metrics.setdefault(key, value)
        return self.make_output(ctx, terms, metrics)

    def extra_repr(self) -> str:
        return f"factors={self.factors}"


def _dedupe_names(losses: list[BaseLoss]) -> None:
    """Renames a single-term loss whose name is taken (``ce``, ``ce_1``); else raises."""
    seen: set[str] = set()
    for loss in losses:
        names = loss.term_names()
        clash = [name for name in names if name in seen]
        if clash and names == [loss.name]:
            i = 1
            while f"{loss.name}_{i}" in seen:
                i += 1
            loss.name = f"{loss.name}_{i}"
            names = [loss.name]
        elif clash:
            raise LossConfigError(
                f"CompositeLoss: {type(loss).__name__} logs {clash}, which another loss logs "
                "too; set name=... on one of them"
            )
        seen.update(names)


def _fusable(loss: BaseLoss) -> bool:
    return isinstance(loss, TokenLoss) and loss.fusable


def _fusion_plan(losses: list[BaseLoss], factors: list[float]) -> list[tuple[BaseLoss, float]]:
    """(loss to run, factor to apply to its terms); token losses sharing weights fuse."""
    groups: dict[tuple, list[int]] = {}
    for i, loss in enumerate(losses):
        if _fusable(loss):
            key = (loss.token_weight_key, loss.weight_key, loss.chunk_size, loss.head_grad_dtype)
            groups.setdefault(key, []).append(i)
    plan, done = [], set()
    for i, loss in enumerate(losses):
        if i in done:
            continue
        members = next((g for g in groups.values() if i in g), [i])
        done.update(members)
        if len(members) == 1:
            plan.append((loss, factors[i]))
        else:
            parts = [losses[j] for j in members]
            plan.append((_FusedTokenLoss(parts, [factors[j] for j in members]), 1.0))
    return plan


class _FusedTokenLoss(TokenLoss):
    """Several token losses over one pass of chunked logits; factors applied per part."""

    def __init__(self, parts: list[TokenLoss], factors: list[float]):
        first = parts[0]
        super().__init__(
            chunk_size=first.chunk_size,
            head_grad_dtype=first.head_grad_dtype,
            reduction=first.reduction,
            name="+".join(part.name for part in parts),
        )
        self.parts = parts  # a plain list: the parts are registered in the CompositeLoss
        self.factors = factors
        self._policy: dict[str, str] = {}

    @property
    def weight_key(self) -> str:
        return self.parts[0].weight_key

    @property
    def token_weight_key(self) -> str:
        return self.parts[0].token_weight_key

    @property
    def logit_rows(self) -> int:  # type: ignore[override]
        # The chunk, a gradient accumulator, one copy per further part, and the extra rows
        # the hungriest part needs beyond its own copy.
        copies = min(len(self.parts), 3)
        return copies + max(part.logit_rows for part in self.parts) - 1

    def term_names(self) -> list[str]:
        return [name for part in self.parts for name in part.term_names()]

    def loss_and_grad(self, logits, targets, extras, weights):
        # Earlier parts work on copies and sum their gradients in `acc`; the last part works
        # on the chunk's own buffer and adds `acc` to its gradient.
        values: dict[str, Tensor] = {}
        acc = None
        for part, factor in zip(self.parts[:-1], self.factors[:-1]):
            own = scratch("fused.acc" if acc is None else "fused.part", logits).copy_(logits)
            grad = self._part(part, factor, own, targets, extras, weights, values)
            if acc is None:
                acc = grad if grad is own else own.copy_(grad)
            else:
                acc.add_(grad)
        last, factor = self.parts[-1], self.factors[-1]
        return values, self._part(last, factor, logits, targets, extras, weights, values).add_(acc)

    def _part(self, part, factor, logits, targets, extras, weights, values) -> Tensor:
        part_values, grad = part.loss_and_grad(logits, targets, extras, weights * factor)
        for key, value in part_values.items():
            values[key] = value * factor
            self._policy[key] = part.nonfinite
        return grad

    def forward(self, ctx: LossContext) -> LossOutput:
        out = super().forward(ctx)
        for name, term in out.terms.items():
            term.nonfinite = self._policy.get(name, term.nonfinite)
        return out
