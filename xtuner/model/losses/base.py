"""The loss contract: what a loss receives, what it returns, and the two base classes.

A model hands its loss a :class:`LossContext`: the final hidden states (not logits), the
output head's weight and bias, the labels already shifted to next-token targets, one
per-token weight tensor per weight key, and per-token extras. The loss returns a
:class:`LossOutput`: named weighted *sums* (``sum_t w_t * l_t``) and metrics. The framework
(:mod:`xtuner.model.losses.normalize`) divides each sum by the right denominator: the
micro-batch's, or the global one of the accumulation window on every rank, and takes care
of sequence-parallel shards. A loss never divides by a token count itself.

Two levels for authors:

* :class:`TokenLoss` -- write :meth:`TokenLoss.token_loss`, the loss of each target token
  from its logits row. The base class computes logits chunk by chunk from the hidden
  states and hands back each chunk's gradient computed during the forward pass, so a
  ``[tokens x vocab]`` tensor never exists whole and nothing is recomputed in backward.
  Built-in losses also override :meth:`TokenLoss.loss_and_grad` with a closed-form
  gradient computed in place, which keeps the extra memory at one chunk of logits.
* :class:`BaseLoss` -- override :meth:`BaseLoss.forward` and return any terms (e.g. a
  sequence-level objective), optionally with a denominator of their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xtuner.utils.constants import IGNORE_INDEX

from .functional import linear_into, logits_view, scratch_pool, vocab_major
from .head import LogitTransform

if TYPE_CHECKING:
    from .router import RouterOutputs

REDUCTIONS = ("token", "sample", "square")
HEAD_GRAD_DTYPES = ("float32", "head")
NONFINITE_POLICIES = ("raise", "skip")


class LossInputError(ValueError):
    """The batch lacks something a loss needs, or holds values it cannot use."""


@dataclass(frozen=True)
class WeightSpec:
    """How per-token weights are made.

    Attributes:
        reduction: ``'token'``, ``'sample'`` or ``'square'`` (see :func:`token_weights`).
        ignore_index: a label id to ignore besides ``-100``.
        scale: a hook ``(labels, weights) -> weights`` (e.g. class weights).
        use_loss_weight: multiply the data's ``loss_weight`` in (when the batch has one).
    """

    reduction: str
    ignore_index: int | None = None
    scale: Callable[[Tensor, Tensor], Tensor] | None = None
    use_loss_weight: bool = True


@dataclass
class LossContext:
    """Everything a loss may use for one micro-batch (one sequence-parallel shard).

    Attributes:
        hidden_states: final hidden states ``[B, S, D]`` (after the final norm).
        head_weight: the output head's effective weight ``[V, D]`` (LoRA deltas, tied
            embeddings and weight normalisation applied; see :mod:`.head`).
        head_bias: output head bias ``[V]`` or None.
        labels: next-token targets ``[B, S]``; ``IGNORE_INDEX`` where there is none.
        weights: weight key -> per-token weights ``[B, S]`` (0 where ignored), computed by
            :func:`compute_weights` from :meth:`BaseLoss.weight_specs`.
        extras: per-token tensors ``[B, S, ...]`` that the loss asked for
            (:meth:`BaseLoss.extra_inputs`), split like the labels.
        batch: the model's whole input batch before any sequence-parallel split.
        iteration: the training iteration, when known (for messages).
        logit_transform: the head's post-processing of ``h @ W.T + b`` (soft cap,
            multipliers; see :mod:`xtuner.model.losses.head`).
        router: the MoE router outputs (:class:`~xtuner.model.losses.router.RouterOutputs`)
            when the model returns router logits, else None.

    With ``loss=dict(..., head='model')`` the model computes its own logits: then
    ``hidden_states`` holds those logits ``[B, S, V]`` and ``head_weight`` is None.
    """

    hidden_states: Tensor
    head_weight: Tensor | None
    head_bias: Tensor | None
    labels: Tensor
    weights: dict[str, Tensor]
    extras: dict[str, Tensor] = field(default_factory=dict)
    batch: dict[str, Any] = field(default_factory=dict)
    iteration: int | None = None
    logit_transform: LogitTransform = field(default_factory=LogitTransform)
    router: RouterOutputs | None = None

    @property
    def vocab_size(self) -> int:
        """The number of logits per token."""
        if self.head_weight is None:
            return self.hidden_states.shape[-1]
        return self.head_weight.shape[0]

    def head_logits(self, hidden: Tensor) -> Tensor:
        """Logits of ``hidden`` (rows of :attr:`hidden_states`) as the model computes them:
        the head's weight and bias, then its post-processing (soft cap, multipliers). Full
        losses call this instead of ``F.linear`` on the head; all rows at once."""
        if self.head_weight is None:
            return hidden
        logits = F.linear(hidden.to(self.head_weight.dtype), self.head_weight, self.head_bias)
        return self.logit_transform(logits)


@dataclass
class LossTerm:
    """One named term: a weighted sum and how it is normalised.

    Attributes:
        value: ``sum_t w_t * l_t`` over this shard's tokens (a scalar tensor with grad).
        weight_key: which weights' sum is the denominator; see :attr:`BaseLoss.weight_key`.
        denominator: set only by full losses that normalise by something else (e.g. the
            number of preference pairs); then ``value`` is this shard's part of the sum and
            ``denominator`` covers the whole (unsplit) micro-batch: under sequence parallel
            the shards' values are summed (logged) and the gradient is scaled so that it is
            that of ``sum / denominator``.
        nonfinite: what to do when the term is NaN or Inf (``'raise'`` or ``'skip'``);
            None is ``'raise'``. :meth:`BaseLoss.make_output` fills in the loss's option.
        grad_group: terms with the same group share one gradient computation (the terms
            of one chunked pass): they are back-propagated together, with equal output
            gradients, and ``'skip'`` drops them together.
    """

    value: Tensor
    weight_key: str = "token"
    denominator: Tensor | None = None
    nonfinite: str | None = None
    grad_group: str | None = None


@dataclass
class LossOutput:
    """Named terms (logged as ``loss_<name>``, summed for backward) and metrics.

    Attributes:
        terms: term name -> :class:`LossTerm`.
        metrics: values logged next to the loss (names must not contain ``'loss'``);
            ``acc_correct``/``acc_total`` become ``acc`` and ``num_tokens``.
        iteration: the training iteration, for messages.
        anchor: a zero with a finite gradient path to the hidden states and the head; it
            replaces skipped terms so every parameter still gets a (zero) gradient.
    """

    terms: dict[str, LossTerm]
    metrics: dict[str, Tensor] = field(default_factory=dict)
    iteration: int | None = None
    anchor: Tensor | None = None


def zero_anchor(ctx: LossContext) -> Tensor:
    """A zero that reaches the hidden states and the head (cheap: one element of each).

    ``nan_to_num`` keeps it exactly 0, with a zero gradient, when those elements are NaN or
    Inf (``x * 0`` alone would be NaN). The model replaces it by a zero that reaches every
    parameter directly (``finalize_loss(anchor=...)``), so a skipped step also does not
    back-propagate through non-finite activations.
    """
    parts = [ctx.hidden_states] + ([] if ctx.head_weight is None else [ctx.head_weight])
    zero = sum(torch.nan_to_num(p.reshape(-1)[:1].sum() * 0, 0.0, 0.0, 0.0) for p in parts)
    return zero.float()


class BaseLoss(nn.Module):
    """Base of every loss. Subclasses override :meth:`forward` (a full loss).

    Args:
        reduction: ``'token'`` (every valid token weighs the same), ``'sample'`` (each sample
            weighs the same: tokens weighted by ``1/n_tokens``) or ``'square'`` (tokens
            weighted by ``1/sqrt(n_tokens)``).
        ignore_index: an extra label id to ignore besides ``-100`` (e.g. a pad id).
        name: the name this loss's term is logged under (``loss_<name>``).
        nonfinite: ``'raise'`` stops training when a term is NaN or Inf, naming the term
            and the iteration; ``'skip'`` logs a warning and drops the term from that step
            (value 0, no gradient; terms computed in the same pass are dropped with it).
    """

    #: batch fields this loss needs, with the data option that produces each (for errors).
    required_fields: dict[str, str] = {}
    #: the term name when none is given.
    default_name: str = "loss"
    #: False for losses whose gradient is on purpose not the derivative of their value (a
    #: stop-gradient inside, as DFT): ``xtuner check-loss`` then reports a gradcheck
    #: mismatch as expected instead of failing.
    gradient_matches_value: bool = True

    def __init__(
        self,
        reduction: str = "token",
        ignore_index: int | None = None,
        name: str | None = None,
        nonfinite: str = "raise",
    ):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"{type(self).__name__}: reduction={reduction!r} is not one of {REDUCTIONS}"
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(
                f"{type(self).__name__}: nonfinite={nonfinite!r} is not one of {NONFINITE_POLICIES}"
            )
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.name = name or self.default_name
        self.nonfinite = nonfinite

    def weight_spec(self) -> WeightSpec:
        """How this loss's per-token weights (and so its denominator) are made."""
        scale = self.scale_token_weights if self.scales_token_weights else None
        return WeightSpec(self.reduction, self.ignore_index, scale)

    @property
    def weight_key(self) -> str:
        """Names the weights whose sum normalises this loss (shared by losses that agree)."""
        if self.weight_spec() == WeightSpec(self.reduction):
            return self.reduction
        return f"{self.reduction}@{self.name}"

    @property
    def scales_token_weights(self) -> bool:
        """Whether :meth:`scale_token_weights` changes the weights."""
        return type(self).scale_token_weights is not BaseLoss.scale_token_weights

    def weight_specs(self) -> dict[str, WeightSpec]:
        """Weight key -> how to compute those weights, for every term this loss returns."""
        return {self.weight_key: self.weight_spec()}

    def scale_token_weights(self, labels: Tensor, weights: Tensor) -> Tensor:
        """Hook to scale per-token weights by the target (e.g. class weights)."""
        return weights

    def term_names(self) -> list[str]:
        """The names of the terms this loss returns (checked for clashes in a composite)."""
        return [self.name]

    def check_fields(self, batch: dict[str, Any]) -> None:
        """Raises :class:`LossInputError` naming each required field the batch lacks."""
        missing = [key for key in self.required_fields if batch.get(key) is None]
        if missing:
            how = "; ".join(f"'{key}': {self.required_fields[key]}" for key in missing)
            raise LossInputError(
                f"{type(self).__name__} (loss '{self.name}') needs the batch field(s) "
                f"{missing}, which the data does not provide. To produce them: {how}"
            )

    def extra_inputs(self, batch: dict[str, Any], labels: Tensor) -> dict[str, Tensor]:
        """Per-token tensors ``[B, S, ...]`` computed before any sequence-parallel split.

        Called by the model on the whole batch with the shifted labels. The default
        checks :attr:`required_fields` and adds nothing; a distillation loss runs its
        teacher here.
        """
        self.check_fields(batch)
        return {}

    def make_output(
        self,
        ctx: LossContext,
        terms: dict[str, Tensor | LossTerm],
        metrics: dict[str, Tensor] | None = None,
    ) -> LossOutput:
        """Wraps terms (tensors become :class:`LossTerm` of :attr:`weight_key`) with this
        loss's NaN policy, the iteration and a zero anchor. Full losses return this."""
        out: dict[str, LossTerm] = {}
        for name, term in terms.items():
            if not isinstance(term, LossTerm):
                term = LossTerm(term, self.weight_key)
            if term.nonfinite is None:
                term.nonfinite = self.nonfinite
            out[name] = term
        return LossOutput(out, dict(metrics or {}), ctx.iteration, zero_anchor(ctx))

    def forward(self, ctx: LossContext) -> LossOutput:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(ctx)")

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, name={self.name!r}"


class TokenLoss(BaseLoss):
    """A loss defined token by token: implement :meth:`token_loss`.

    Args:
        chunk_size: how many rows of vocabulary-sized float32 logits may exist at a time;
            extra memory of the loss is about ``chunk_size x vocab x 4`` bytes plus the
            head's gradient. A loss that needs :attr:`logit_rows` such rows per token
            processes ``chunk_size // logit_rows`` tokens per chunk. 0 or None computes
            all logits at once.
        head_grad_dtype: ``'float32'`` accumulates the head's weight and bias gradients over
            the chunks in float32 for a 16-bit head (one fp32 GEMM per chunk; no rounding
            that grows with the chunk count, no fp16 overflow of the unnormalised sum);
            ``'head'`` accumulates in the head's dtype (half the memory of the accumulator,
            16-bit GEMMs; its error grows with the number of chunks).
        **kwargs: see :class:`BaseLoss`.
    """

    #: vocabulary-sized float rows one token needs while its loss and gradient are
    #: computed (the logits row included). The autograd path of :meth:`loss_and_grad`
    #: holds about 4 (logits, log-softmax, gradients); built-ins that work in place need 1.
    logit_rows: int = 4

    def __init__(self, chunk_size: int | None = 1024, head_grad_dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        if chunk_size is not None and chunk_size < 0:
            raise ValueError(f"{type(self).__name__}: chunk_size must be >= 0, got {chunk_size}")
        if head_grad_dtype not in HEAD_GRAD_DTYPES:
            raise ValueError(
                f"{type(self).__name__}: head_grad_dtype={head_grad_dtype!r} is not one of "
                f"{HEAD_GRAD_DTYPES}"
            )
        self.chunk_size = chunk_size or 0
        self.head_grad_dtype = head_grad_dtype

    @property
    def token_weight_key(self) -> str:
        """Names the weights that multiply each token's loss (by default those of the
        denominator, :attr:`weight_key`)."""
        return self.weight_key

    @property
    def fusable(self) -> bool:
        """Whether a composite may run this loss in one chunked pass with other token losses
        (through :meth:`loss_and_grad`); not when it overrides :meth:`forward`."""
        return type(self).forward is TokenLoss.forward

    def tokens_per_chunk(self, n_tokens: int) -> int:
        """How many tokens' logits one chunk holds."""
        if not self.chunk_size:
            return max(n_tokens, 1)
        return max(1, self.chunk_size // self.logit_rows)

    def token_loss(
        self, logits: Tensor, targets: Tensor, extras: dict[str, Tensor]
    ) -> Tensor | dict[str, Tensor]:
        """Loss of each target token.

        Args:
            logits: ``[n, V]`` float32 (or float64) logits of ``n`` valid tokens.
            targets: ``[n]`` target ids.
            extras: the per-token extras of those tokens, ``[n, ...]`` each.

        Returns:
            ``[n]`` per-token losses (the term :attr:`name`), or a dict of them for
            several terms, keyed by term name (each logged as ``loss_<name>``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement token_loss")

    def loss_and_grad(
        self, logits: Tensor, targets: Tensor, extras: dict[str, Tensor], weights: Tensor
    ) -> tuple[dict[str, Tensor], Tensor]:
        """Per-token losses of one chunk and the gradient of their weighted sum.

        The default differentiates :meth:`token_loss` with autograd. Overrides may work in
        place on ``logits`` (the chunk owns it) to save memory.

        Args:
            logits: ``[n, V]`` float logits of the chunk; may be overwritten.
            targets: ``[n]`` target ids.
            extras: per-token extras of the chunk.
            weights: ``[n]`` token weights.

        Returns:
            (term name -> ``[n]`` detached per-token losses, ``d sum_k sum_t w_t l_kt / d
            logits`` of shape ``[n, V]``).
        """
        logits = logits.detach().requires_grad_()
        with torch.enable_grad():
            out = self.token_loss(logits, targets, extras)
            if not isinstance(out, dict):
                out = {self.name: out}
            total = sum((value * weights).sum() for value in out.values())
        if isinstance(total, Tensor) and total.requires_grad:
            (grad,) = torch.autograd.grad(total, logits)
        else:
            grad = torch.zeros_like(logits)
        return {key: value.detach() for key, value in out.items()}, grad

    def valid_tokens(
        self, ctx: LossContext
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor], Tensor]:
        """The tokens this loss weighs: ``(hidden [n, D], targets [n], weights [n], extras,
        valid mask [B, S])``, with targets checked against the head and the weights in the
        compute dtype. Views, not copies, when every position counts."""
        tok_w = ctx.weights[self.token_weight_key]
        valid = tok_w != 0
        dim = ctx.hidden_states.shape[-1]
        if bool(valid.all()):
            hidden = ctx.hidden_states.reshape(-1, dim)
            targets, tok_w = ctx.labels.reshape(-1), tok_w.reshape(-1)
            extras = {k: v.reshape(-1, *v.shape[2:]) for k, v in ctx.extras.items()}
        else:
            hidden, targets, tok_w = ctx.hidden_states[valid], ctx.labels[valid], tok_w[valid]
            extras = {k: v[valid] for k, v in ctx.extras.items()}
        check_targets(targets, ctx.vocab_size, type(self).__name__)
        head_dtype = (ctx.head_weight if ctx.head_weight is not None else hidden).dtype
        tok_w = tok_w.to(torch.promote_types(head_dtype, torch.float32))
        return hidden, targets, tok_w, extras, valid

    def forward(self, ctx: LossContext) -> LossOutput:
        hidden, targets, tok_w, extras, valid = self.valid_tokens(ctx)
        sums, n_correct = chunked_token_loss(
            self,
            hidden,
            ctx.head_weight,
            ctx.head_bias,
            targets,
            tok_w,
            extras,
            ctx.logit_transform,
        )
        group = "+".join(sums)
        terms = {
            key: LossTerm(value, self.weight_key, grad_group=group) for key, value in sums.items()
        }
        metrics = {"acc_correct": n_correct, "acc_total": valid.sum().to(n_correct)}
        return self.make_output(ctx, terms, metrics)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunk_size={self.chunk_size}"


def check_targets(targets: Tensor, vocab_size: int, owner: str) -> None:
    """Raises :class:`LossInputError` if a target id is outside ``[0, vocab_size)``."""
    if targets.numel() == 0:
        return
    low, high = torch.stack([targets.min(), targets.max()]).tolist()
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise LossInputError(
            f"{owner}: label id {bad} is outside the output head's vocabulary [0, {vocab_size}). "
            "The tokenizer and the model disagree: resize the embeddings (SupervisedFinetune's "
            "tokenizer=...) or mark the position with -100"
        )


def chunked_token_loss(
    loss: TokenLoss,
    hidden: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    targets: Tensor,
    tok_w: Tensor,
    extras: dict[str, Tensor],
    transform: LogitTransform | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Weighted sums of a token loss, computed chunk by chunk with gradients in forward.

    Args:
        loss: the token loss.
        hidden: ``[n, D]`` hidden states of the valid tokens (``[n, V]`` logits when
            ``weight`` is None: ``head='model'``).
        weight: ``[V, D]`` effective head weight or None; ``bias``: ``[V]`` or None.
        targets: ``[n]`` target ids; ``tok_w``: ``[n]`` token weights.
        extras: per-token extras, ``[n, ...]`` each.
        transform: the head's logit post-processing (None: none).

    Returns:
        (term name -> ``sum(w * l)``, number of tokens whose target has the largest logit).
    """
    names: list[str] = []  # filled by the forward: an autograd.Function returns tensors only
    transform = transform or LogitTransform()
    # Under no_grad / inference_mode nothing is differentiated: no gradient is computed.
    grad_on = torch.is_grad_enabled()
    outputs = _ChunkedTokenLoss.apply(
        hidden,
        weight,
        bias,
        targets,
        tok_w,
        (loss, transform, grad_on),
        names,
        list(extras),
        *extras.values(),
    )
    return dict(zip(names, outputs[:-1])), outputs[-1]


def _chunk_pass(
    loss: TokenLoss,
    transform: LogitTransform,
    hidden: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    targets: Tensor,
    tok_w: Tensor,
    extras: dict[str, Tensor],
    need: tuple[bool, bool, bool],
) -> tuple[dict[str, Tensor], Tensor, list[Tensor | None]]:
    """Loss sums, accuracy count and the gradients w.r.t. (hidden, weight, bias).

    Per chunk: one matmul for the raw logits, the head's post-processing, the loss's own
    gradient w.r.t. the logits (usually in place) turned into that w.r.t. the raw logits,
    then two matmuls accumulating straight into preallocated gradients. Without a weight
    (``head='model'``) the rows of ``hidden`` are the logits and their gradient is stored.
    """
    n = hidden.shape[0]
    step = loss.tokens_per_chunk(n)
    head_dtype = (weight if weight is not None else hidden).dtype
    # Under torch.autocast a float32 head's GEMMs run in the autocast dtype (out= GEMMs
    # bypass autocast, so the cast is done here, once per pass).
    gemm_dtype = _autocast_dtype(hidden.device, head_dtype) or head_dtype
    gemm_weight, gemm_bias = weight, bias
    if weight is not None and gemm_dtype != head_dtype:
        gemm_weight = weight.to(gemm_dtype)
        gemm_bias = None if bias is None else bias.to(gemm_dtype)
    compute_dtype = torch.promote_types(gemm_dtype, torch.float32)
    acc_dtype = head_dtype
    if loss.head_grad_dtype == "float32":
        acc_dtype = torch.promote_types(head_dtype, torch.float32)
    # A 16-bit head accumulating in float32 takes its weight gradient from the float32
    # logits gradient (an fp32 GEMM); under autocast the GEMM stays 16-bit, summed in fp32.
    fp32_grad_w = gemm_dtype == head_dtype and acc_dtype != head_dtype
    grad_h = hidden.new_empty(hidden.shape, dtype=gemm_dtype) if need[0] else None
    grad_w = None
    if need[1] and weight is not None:
        grad_w = torch.zeros_like(weight, dtype=acc_dtype)
    grad_b = torch.zeros_like(bias, dtype=acc_dtype) if need[2] and bias is not None else None
    sums: dict[str, Tensor] = {}
    n_correct = torch.zeros((), dtype=torch.float32, device=hidden.device)
    # The logits of every chunk go to the same buffer(s): fresh [chunk x V] allocations
    # cost page faults on CPU. Half-precision GEMMs also get a float32 copy.
    vocab = weight.shape[0] if weight is not None else hidden.shape[-1]
    rows = min(step, max(n, 1))
    major = vocab_major(hidden.device)
    buffer = hidden.new_empty(rows * vocab, dtype=gemm_dtype)
    upcast = None
    if buffer.dtype != compute_dtype:
        upcast = buffer.new_empty(buffer.shape, dtype=compute_dtype)
    with scratch_pool():
        # One (possibly empty) chunk even without tokens, so the term names are known.
        for start in range(0, max(n, 1), step):
            end = min(start + step, n)
            view = logits_view(buffer, end - start, vocab, major)
            if weight is None:
                h = None
                logits = view.copy_(hidden[start:end])
            else:
                h = hidden[start:end].to(gemm_dtype)
                logits = linear_into(h, gemm_weight, gemm_bias, view)
            if upcast is not None:
                logits = logits_view(upcast, end - start, vocab, major).copy_(logits)
            saved = transform.apply_(logits)
            y = targets[start:end]
            # Correct when the target's logit is the row's maximum (cheaper than argmax).
            n_correct += (logits.gather(1, y[:, None]).squeeze(1) >= logits.amax(-1)).sum()
            w = tok_w[start:end]
            values, grad = loss.loss_and_grad(
                logits, y, {k: v[start:end] for k, v in extras.items()}, w
            )
            del logits
            for key, value in values.items():
                part = (value * w).sum()
                sums[key] = part if key not in sums else sums[key] + part
            if not any(need):
                continue
            grad = full = transform.grad_(grad, saved)
            grad_for_w = None
            if grad.dtype != gemm_dtype:
                # The half-precision gradient goes to the logits buffer, free by now.
                grad = logits_view(buffer, end - start, vocab, major).copy_(full)
                if major and grad_w is not None and not fp32_grad_w:
                    # CPU half-precision GEMMs are fast only with the reduced dimension
                    # contiguous: vocabulary-major for grad_h, row-major for grad_w (else
                    # 10-70x slower here). A row-major copy costs half an fp32 chunk.
                    grad_for_w = grad.contiguous()
            if grad_h is not None:
                if weight is None:
                    grad_h[start:end].copy_(grad)
                else:
                    torch.mm(grad, gemm_weight, out=grad_h[start:end])
            if grad_w is not None:
                if fp32_grad_w:
                    grad_w.addmm_(full.t(), h.to(acc_dtype))
                elif grad_w.dtype == gemm_dtype:
                    grad_w.addmm_((grad if grad_for_w is None else grad_for_w).t(), h)
                else:
                    grad_w.add_(torch.mm((grad if grad_for_w is None else grad_for_w).t(), h))
            if grad_b is not None:
                grad_b.add_(full.sum(0).to(acc_dtype))
            del grad, grad_for_w, full  # the next chunk overwrites the buffers
    return sums, n_correct, [grad_h, grad_w, grad_b]


def _autocast_dtype(device: torch.device, head_dtype: torch.dtype) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``device`` and the head is float32."""
    if head_dtype != torch.float32 or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


class _ChunkedTokenLoss(torch.autograd.Function):
    """Forward computes each chunk's loss *and* its gradient; backward only scales them.

    Since the loss is the last operation of the graph, the gradient of a weighted sum with
    respect to hidden states and head is known once the forward is done; computing it chunk
    by chunk in the forward keeps the peak at one chunk of logits, with no recomputation.
    All terms share one gradient (that of their sum), so backward needs equal output
    gradients for them, which the normalisation always gives. The stored gradients are
    scaled in place and handed over (no copy of the head's gradient); a second backward
    through the same graph (``retain_graph=True``) recomputes them. The gradient is not
    itself differentiable: a double backward (``create_graph=True``) raises.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tok_w, how, names, keys, *extra_values):
        loss, transform, grad_on = how
        need = tuple(grad_on and flag for flag in ctx.needs_input_grad[:3])
        extras = dict(zip(keys, extra_values))
        sums, n_correct, grads = _chunk_pass(
            loss, transform, hidden, weight, bias, targets, tok_w, extras, need
        )
        names.extend(sums)
        ctx.loss, ctx.transform, ctx.keys, ctx.need, ctx.grads = loss, transform, keys, need, grads
        ctx.save_for_backward(hidden, weight, bias, targets, tok_w, *extra_values)
        ctx.mark_non_differentiable(n_correct)
        return (*sums.values(), n_correct)

    @staticmethod
    def backward(ctx, *grad_outputs):
        if torch.is_grad_enabled():
            raise RuntimeError(
                f"{type(ctx.loss).__name__}: the chunked loss computes its gradient in the "
                "forward pass and cannot be differentiated twice (backward or autograd.grad "
                "with create_graph=True). Compute second-order terms from the logits of a "
                "full loss (BaseLoss, ctx.head_logits) instead."
            )
        grads, ctx.grads = ctx.grads, None
        hidden, weight, bias, targets, tok_w, *extra_values = ctx.saved_tensors
        if grads is None:
            extras = dict(zip(ctx.keys, extra_values))
            grads = _chunk_pass(
                ctx.loss, ctx.transform, hidden, weight, bias, targets, tok_w, extras, ctx.need
            )[2]
        term_grads = grad_outputs[:-1]
        scale = term_grads[0]
        if len(term_grads) > 1 and not bool(torch.stack(term_grads).eq(scale).all()):
            raise RuntimeError(
                f"{type(ctx.loss).__name__}: its terms share one gradient computation, so they "
                "must be back-propagated together with equal weights (got output gradients "
                f"{[float(g) for g in term_grads]}). Weight terms with loss_weight in the loss "
                "config instead of after the loss."
            )
        out = []
        for grad, like in zip(grads, (hidden, weight, bias)):
            out.append(None if grad is None else grad.mul_(scale).to(like.dtype))
        return (*out, None, None, None, None, None, *([None] * len(extra_values)))


def valid_targets(labels: Tensor, ignore_index: int | None = None) -> Tensor:
    """Boolean mask of positions that have a target."""
    valid = labels != IGNORE_INDEX
    if ignore_index is not None and ignore_index != IGNORE_INDEX:
        valid &= labels != ignore_index
    return valid


def sample_ids_from_positions(position_ids: Tensor) -> Tensor:
    """Numbers the samples of each row: a new sample starts wherever the position is 0."""
    return torch.cumsum((position_ids == 0).long(), dim=-1)


def token_weights(
    labels: Tensor,
    reduction: str,
    position_ids: Tensor | None = None,
    loss_weight: Tensor | None = None,
    ignore_index: int | None = None,
) -> Tensor:
    """Per-token weights ``[B, S]`` for one reduction mode (0 where there is no target).

    ``token``: ``loss_weight`` (or 1). ``sample``: also ``1 / n_tokens(sample)``. ``square``:
    also ``1 / sqrt(n_tokens(sample))``. Samples are rows, or the documents of a packed row
    (a document starts where ``position_ids`` is 0). Computed on whole sequences, before any
    sequence-parallel split, so every shard weighs a sample the same way.
    """
    valid = valid_targets(labels, ignore_index)
    weights = valid.float()
    if loss_weight is not None:
        weights = weights * loss_weight.float()
    if reduction == "token":
        return weights
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
    if position_ids is None:
        sample_ids = torch.zeros_like(labels)
    else:
        sample_ids = sample_ids_from_positions(position_ids.expand_as(labels))
    # Count valid tokens per (row, sample) with a scatter over a flat index.
    n_per_row = int(sample_ids.max().item()) + 1 if sample_ids.numel() else 1
    flat = sample_ids + torch.arange(labels.shape[0], device=labels.device)[:, None] * n_per_row
    counts = torch.zeros(labels.shape[0] * n_per_row, device=labels.device)
    counts.scatter_add_(0, flat.reshape(-1), valid.float().reshape(-1))
    per_token_count = counts[flat].clamp_min(1.0)
    scale = 1.0 / per_token_count if reduction == "sample" else per_token_count.rsqrt()
    return weights * scale


def compute_weights(
    specs: dict[str, WeightSpec],
    labels: Tensor,
    position_ids: Tensor | None = None,
    loss_weight: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-token weights for every weight key of a loss (before any sequence-parallel split)."""
    out: dict[str, Tensor] = {}
    for key, spec in specs.items():
        data_weight = loss_weight if spec.use_loss_weight else None
        weights = token_weights(
            labels, spec.reduction, position_ids, data_weight, spec.ignore_index
        )
        out[key] = spec.scale(labels, weights) if spec.scale is not None else weights
    return out
