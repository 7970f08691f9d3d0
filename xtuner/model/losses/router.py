"""MoE router losses: the load-balancing auxiliary loss and the router z-loss.

A mixture-of-experts model (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) whose config sets
``output_router_logits=True`` adds ``router_aux_loss_coef * aux_loss`` to its own loss. The
model hands the router logits of every MoE layer to its loss as
``LossContext.router`` (:class:`RouterOutputs`); :class:`RouterAuxLoss` computes the
auxiliary loss as the family's ``load_balancing_loss_func`` does (checked against it on the
first call), so the sum ``loss_ce + loss_router_aux`` equals the HF model's loss. When the
config asks for router logits and the loss config names no router loss,
:class:`RouterAuxLoss` with the config's coefficient is added.

Both losses are functions of sums over the tokens (top-k assignments and router
probabilities per expert, ``logsumexp^2``) and of the token count. Under sequence parallel
each rank sums its shard and the sums are all-reduced over the group (differentiably, see
:func:`~xtuner.parallel.comm.sp_all_reduce_sum_with_grad`), so every rank gets the value of
the whole sequence and the gradients are those of one process: sp=2 equals sp=1.

Normalisation across micro-batches and data-parallel ranks: each forward (one micro-batch,
all its sequence-parallel shards together) contributes its own value, as the HF model
computes it per forward. The optimizer step gets the mean over the micro-batches of the
accumulation window (the optim wrapper divides by its ``accumulative_counts``) and over the
data-parallel ranks (DDP averages). Statistics pooled over the whole window would need every
micro-batch's routing before the first backward, which gradient accumulation rules out, and
weighting forwards by their token count would make the coefficient mean something else with
every batch size; with the mean of per-forward values, ``router_aux_loss_coef`` keeps the
meaning it has in the HF model's forward, for any accumulation and number of ranks.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from xtuner.parallel.comm import sp_all_reduce_sum_with_grad
from xtuner.parallel.sequence import get_sequence_parallel_world_size
from xtuner.registry import LOSSES

from .base import BaseLoss, LossContext, LossInputError, LossOutput, LossTerm


@dataclass
class BalanceScheme:
    """How a family turns the routing statistics into its balance loss.

    The default is the Switch Transformer's (Mixtral, Qwen2-MoE, Qwen3-MoE): the statistics
    pooled over every MoE layer, experts chosen by a plain top-k of the probabilities. A
    family that balances another way returns its scheme from a ``router_balance_scheme()``
    method of its model (DeepSeek-V2: per layer, group-limited choice, shares of the top-k).

    Attributes:
        per_layer: the sum over layers of each layer's ``E * sum_e f_e * P_e`` instead of one
            value of the statistics pooled over the layers.
        choose: ``probs [T, E] -> [T, top_k]`` expert indices; None: ``topk(probs)``.
        divide_by_top_k: ``f_e`` is the share of the ``T * top_k`` choices (DeepSeek-V2)
            instead of the fraction of the ``T`` tokens (Switch).
    """

    per_layer: bool = False
    choose: Callable[[Tensor], Tensor] | None = None
    divide_by_top_k: bool = False


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
        scheme: how the statistics make the family's balance loss.
    """

    logits: tuple[Tensor, ...]
    attention_mask: Tensor | None
    num_experts: int
    top_k: int
    aux_coef: float
    balance_fn: Callable[..., Tensor]
    scheme: BalanceScheme = field(default_factory=BalanceScheme)


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
        # the model's own scheme where it has one, else the Switch Transformer's
        scheme=getattr(model, "router_balance_scheme", BalanceScheme)(),
    )


class _RouterLoss(BaseLoss):
    """A term computed from the router logits of one whole forward (see the module doc)."""

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
        # Every rank of a sequence-parallel group holds the whole sequence's value. A term
        # with its own denominator is logged as the sum over the group and back-propagated
        # times sp: each rank returns 1/sp of it. Each rank's backward through the
        # all-reduce of the sums then reaches every shard, and DDP's mean over the group
        # leaves exactly the gradient of the value.
        sp = get_sequence_parallel_world_size()
        one = torch.ones((), dtype=value.dtype, device=value.device)
        return self.make_output(ctx, {self.name: LossTerm(value / sp, denominator=one)})

    def extra_repr(self) -> str:
        return f"coef={self.coef}, name={self.name!r}"


def _token_mask(router: RouterOutputs) -> Tensor:
    """``[tokens]`` float mask of the tokens that count (the rows of each layer's logits)."""
    logits = router.logits[0]
    if router.attention_mask is None:
        return logits.new_ones(logits.shape[0], dtype=torch.float32)
    return router.attention_mask.reshape(-1).to(device=logits.device, dtype=torch.float32)


def balance_sums(router: RouterOutputs) -> Tensor:
    """This shard's sums of the load-balancing statistics, ``[layers, 2E + 1]``: per MoE
    layer, the router probabilities per expert, the expert choices per expert and the number
    of unpadded tokens."""
    mask = _token_mask(router)
    choose = router.scheme.choose
    rows = []
    for layer in router.logits:
        p = torch.softmax(layer.float(), dim=-1)
        chosen = choose(p) if choose else torch.topk(p, router.top_k, dim=-1).indices
        counts = mask.new_zeros(router.num_experts).scatter_add(
            0, chosen.reshape(-1), mask.repeat_interleave(router.top_k)
        )
        rows.append(torch.cat([(p * mask[:, None]).sum(0), counts.detach(), mask.sum()[None]]))
    return torch.stack(rows)


def balance_loss(sums: Tensor, router: RouterOutputs) -> Tensor:
    """``E * sum_e f_e * P_e`` from :func:`balance_sums` (Switch Transformer eq. 4), pooled
    over the layers or summed per layer as the family's :class:`BalanceScheme` says."""
    scheme, e = router.scheme, router.num_experts
    if not scheme.per_layer:
        sums = sums.sum(0, keepdim=True)
    tokens = sums[:, -1:].clamp_min(1)
    probs, counts = sums[:, :e] / tokens, sums[:, e:-1] / tokens
    if scheme.divide_by_top_k:
        counts = counts / router.top_k
    return e * (counts * probs).sum()


@LOSSES.register_module()
class RouterAuxLoss(_RouterLoss):
    """The MoE load-balancing loss (Switch Transformer, arXiv 2101.03961, eqs. 4-6) as the
    model family computes it: ``coef * load_balancing_loss_func(router_logits, ...)``, with
    the statistics of the whole sequence under sequence parallel.

    Args:
        coef: the coefficient; None takes the model config's ``router_aux_loss_coef``.
        name: logged as ``loss_<name>`` (default ``router_aux``).
    """

    default_name = "router_aux"

    def __init__(self, coef: float | None = None, name: str | None = None, **kwargs):
        super().__init__(coef=coef, name=name, **kwargs)
        self._checked = False

    def router_value(self, router: RouterOutputs) -> Tensor:
        coef = router.aux_coef if self.coef is None else float(self.coef)
        sums = balance_sums(router)
        if not self._checked:
            self._check_family(router, balance_loss(sums.detach(), router))
        sums = sp_all_reduce_sum_with_grad(sums)
        return coef * balance_loss(sums, router)

    def _check_family(self, router: RouterOutputs, local: Tensor) -> None:
        """Once: the statistics above give what the family's own function gives on this
        shard, so the sums that are gathered under sequence parallel are the right ones."""
        with torch.no_grad():
            theirs = router.balance_fn(
                router.logits, router.num_experts, router.top_k, router.attention_mask
            )
        theirs = torch.as_tensor(theirs, dtype=torch.float32, device=local.device)
        # The family's softmax runs in the logits' dtype (ours in float32): 16-bit rounding,
        # and a top-k choice between near-equal probabilities, move its value a little.
        rtol = 1e-4 if router.logits[0].dtype == torch.float32 else 2e-2
        if not torch.allclose(local, theirs, rtol=rtol, atol=1e-6):
            raise LossInputError(
                f"RouterAuxLoss: the model's load_balancing_loss_func gives {float(theirs)} "
                f"where the routing statistics give {float(local)}: this family balances its "
                "experts another way. Set output_router_logits=False in the llm config and "
                "leave router losses out of the loss config, write a loss (BaseLoss) for its "
                "balancing term, or give the model a router_balance_scheme() method "
                "(xtuner.model.losses.router.BalanceScheme)"
            )
        self._checked = True


@LOSSES.register_module()
class RouterZLoss(_RouterLoss):
    """The router z-loss (ST-MoE, arXiv 2202.08906, eq. 5): ``coef * mean(logsumexp(x)^2)``
    over the router logits ``x`` of every MoE layer and every (unpadded) token of the whole
    sequence.

    Args:
        coef: the coefficient (ST-MoE uses 1e-3).
        name: logged as ``loss_<name>`` (default ``router_z``).
    """

    default_name = "router_z"

    def __init__(self, coef: float = 1e-3, name: str | None = None, **kwargs):
        super().__init__(coef=coef, name=name, **kwargs)

    def router_value(self, router: RouterOutputs) -> Tensor:
        mask = _token_mask(router)
        z = torch.stack([torch.logsumexp(x.float(), dim=-1) for x in router.logits])
        sums = torch.stack([(z.square() * mask).sum(), mask.sum().detach() * z.shape[0]])
        total, rows = sp_all_reduce_sum_with_grad(sums).unbind()
        return self.coef * total / rows.clamp_min(1)


def has_router_loss(loss: nn.Module) -> bool:
    """Whether a loss (or a composite's part) is a router loss."""
    return any(isinstance(module, _RouterLoss) for module in loss.modules())
