"""MoE router losses: the load-balancing auxiliary loss and the router z-loss.

A mixture-of-experts model (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) whose config sets
``output_router_logits=True`` adds ``router_aux_loss_coef * aux_loss`` to its own loss. The
model hands the router logits of every MoE layer to its loss as
``LossContext.router`` (:class:`RouterOutputs`); :class:`RouterAuxLoss` computes the
auxiliary loss with the model family's own ``load_balancing_loss_func`` (from the model's
transformers module), so the sum ``loss_ce + loss_router_aux`` equals the HF model's loss.
When the config asks for router logits and the loss config names no router loss,
:class:`RouterAuxLoss` with the config's coefficient is added.

Normalisation: the auxiliary loss is a mean over the micro-batch's tokens already (the
fraction of tokens routed to each expert times the mean router probability). Each
micro-batch contributes its own value, exactly as the HF model computes it; the optimizer
step's gradient is the mean over the micro-batches of the accumulation window (the optim
wrapper divides by ``accumulative_counts``) and over the data-parallel ranks (DDP
averages), which is what one process running the micro-batches one after the other with
``loss / accumulation_steps`` gets. Under sequence parallel each rank holds a shard of the
sequence: its value is the shard's auxiliary loss, and the logged term and the gradient are
the mean over the shards (the per-token statistics are not gathered across shards: the
balancing is asked of each shard, which is at least as strict).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xtuner.parallel.sequence import get_sequence_parallel_world_size
from xtuner.registry import LOSSES

from .base import BaseLoss, LossContext, LossInputError, LossOutput, LossTerm


@dataclass
class RouterOutputs:
    """What the router losses read.

    Attributes:
        logits: per MoE layer, ``[tokens, num_experts]`` router logits.
        attention_mask: ``[B, S]`` padding mask of the tokens, or None (all count).
        num_experts: experts per layer; ``top_k``: experts chosen per token.
        aux_coef: the config's ``router_aux_loss_coef``.
        balance_fn: the family's ``load_balancing_loss_func(logits, num_experts, top_k,
            attention_mask)``.
    """

    logits: tuple[Tensor, ...]
    attention_mask: Tensor | None
    num_experts: int
    top_k: int
    aux_coef: float
    balance_fn: Callable[..., Tensor]


def balance_function(model: nn.Module) -> Callable[..., Tensor] | None:
    """The family's ``load_balancing_loss_func``, or None: the model's own method where it
    has one (its routing depends on its config, as DeepSeek-V2's group-limited routing), else
    the function of the model's module."""
    own = getattr(model, "load_balancing_loss_func", None)
    if own is not None:
        return own
    return getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)


def wants_router_logits(model: nn.Module) -> bool:
    """Whether the model's config asks for router logits (so its own loss has the aux term)."""
    return bool(getattr(model.config, "output_router_logits", False))


def check_router_model(model: nn.Module) -> None:
    """Raises a clear error when router losses are asked of a model without a router."""
    name = type(model).__name__
    if not hasattr(model.config, "output_router_logits"):
        raise ValueError(
            f"a router loss (RouterAuxLoss / RouterZLoss) is configured, but {name} is not a "
            "mixture-of-experts model (its config has no output_router_logits): remove it"
        )
    if balance_function(model) is None or not hasattr(model, "num_experts_per_tok"):
        raise ValueError(
            f"{name}: its module defines no load_balancing_loss_func (or the model no "
            "num_experts_per_tok), so the router losses cannot be computed the way the model "
            "does; set output_router_logits=False in the llm config and leave router losses "
            "out of the loss config"
        )


def router_outputs(
    model: nn.Module, outputs: object, attention_mask: Tensor | None
) -> RouterOutputs | None:
    """The router outputs of one forward, or None when the model returned none."""
    logits = getattr(outputs, "router_logits", None)
    if not logits:
        return None
    return RouterOutputs(
        logits=tuple(logits),
        attention_mask=attention_mask,
        num_experts=int(model.num_experts),
        top_k=int(model.num_experts_per_tok),
        aux_coef=float(getattr(model.config, "router_aux_loss_coef", 0.0)),
        balance_fn=balance_function(model),
    )


class _RouterLoss(BaseLoss):
    """A term computed from the router logits: a micro-batch mean (see the module doc)."""

    def __init__(self, coef: float | None = None, name: str | None = None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.coef = coef

    def router_value(self, router: RouterOutputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, ctx: LossContext) -> LossOutput:
        if ctx.router is None:
            raise LossInputError(
                f"{type(self).__name__}: the model returned no router logits. Only "
                "mixture-of-experts models have them; set output_router_logits=True in the llm "
                "config (the model does it when a router loss is configured)"
            )
        value = self.router_value(ctx.router)
        # Each sequence-parallel shard holds its own value; the framework sums the shards and
        # multiplies the gradient by sp, so the term is the mean over the shards.
        sp = get_sequence_parallel_world_size()
        one = torch.ones((), dtype=value.dtype, device=value.device)
        return self.make_output(ctx, {self.name: LossTerm(value / sp, denominator=one)})

    def extra_repr(self) -> str:
        return f"coef={self.coef}, name={self.name!r}"


@LOSSES.register_module()
class RouterAuxLoss(_RouterLoss):
    """The MoE load-balancing loss (Switch Transformer, arXiv 2101.03961, eqs. 4-6) as the
    model family computes it: ``coef * load_balancing_loss_func(router_logits, ...)``.

    Args:
        coef: the coefficient; None takes the model config's ``router_aux_loss_coef``.
        name: logged as ``loss_<name>`` (default ``router_aux``).
    """

    default_name = "router_aux"

    def router_value(self, router: RouterOutputs) -> Tensor:
        coef = router.aux_coef if self.coef is None else float(self.coef)
        aux = router.balance_fn(
            router.logits, router.num_experts, router.top_k, router.attention_mask
        )
        return coef * torch.as_tensor(aux, dtype=torch.float32, device=router.logits[0].device)


@LOSSES.register_module()
class RouterZLoss(_RouterLoss):
    """The router z-loss (ST-MoE, arXiv 2202.08906, eq. 5): ``coef * mean(logsumexp(x)^2)``
    over the router logits ``x`` of every MoE layer and every (unpadded) token.

    Args:
        coef: the coefficient (ST-MoE uses 1e-3).
        name: logged as ``loss_<name>`` (default ``router_z``).
    """

    default_name = "router_z"

    def __init__(self, coef: float = 1e-3, name: str | None = None, **kwargs):
        super().__init__(coef=coef, name=name, **kwargs)

    def router_value(self, router: RouterOutputs) -> Tensor:
        z = torch.stack([torch.logsumexp(x.float(), dim=-1) for x in router.logits])
        if router.attention_mask is None:
            return self.coef * z.square().mean()
        mask = router.attention_mask.reshape(1, -1).to(z)
        return self.coef * (z.square() * mask).sum() / (mask.sum() * z.shape[0]).clamp_min(1)


def has_router_loss(loss: nn.Module) -> bool:
    """Whether a loss (or a composite's part) is a router loss."""
    return any(isinstance(module, _RouterLoss) for module in loss.modules())
