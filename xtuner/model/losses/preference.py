"""Preference losses: DPO and its variants, SimPO, CPO, ORPO, KTO and reward-model ranking.

Every loss here is a full loss (:class:`~xtuner.model.losses.base.BaseLoss`) that works on
*sequences*: a batch holds chosen and rejected answers interleaved (``chosen_0, rejected_0,
chosen_1, ...``: one per row when padded, one per packed document when varlen); a loss
finds them as the runs of target tokens (:func:`answer_index`). From the
hidden states a loss computes what it needs per sequence:

* the summed log-probability of the sequence's target tokens (DPO family), chunk by chunk
  from the hidden states with :func:`chunked_target_logps` (no ``[tokens x vocab]`` tensor
  exists, neither for the policy nor for the reference);
* or a scalar score (reward models): the head is then the value head ``[1, D]``.

Sums over a sequence that is split by sequence parallel are completed with a differentiable
all-reduce, so every shard sees the whole sequence's value. The reference model's
log-probabilities arrive in the batch (``ref_logps``, one per sequence), computed by
:class:`xtuner.model.dpo.DPO` or read from its precomputed cache.

Normalisation: per-pair terms are divided by the number of pairs (weight key ``'pairs'``),
token terms (NLL on the chosen answer) by the number of chosen tokens (``'chosen_tokens'``),
per-sequence terms by the number of sequences (``'sequences'``). These counts are sums of
per-token markers made by the losses' weight specs (:data:`PREFERENCE_WEIGHTS`) next to the
usual token weights, so global normalisation over an accumulation window and over ranks,
and the sequence-parallel split, work as for SFT (any model can run these losses).
Metrics (``reward_acc``, ``reward_margin``, ``chosen_rewards``, ...) are logged under names
without ``'loss'``.

Formulas follow TRL's ``DPOTrainer``/``CPOTrainer``/``KTOTrainer`` and the papers cited on
each class; ``docs/en/preference.md`` lists them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xtuner.parallel.comm import sp_all_reduce_sum_with_grad
from xtuner.parallel.sequence import get_sequence_parallel_world_size
from xtuner.registry import LOSSES
from xtuner.utils.constants import IGNORE_INDEX

from .base import (
    BaseLoss,
    LossContext,
    LossInputError,
    LossOutput,
    LossTerm,
    WeightSpec,
    check_targets,
)
from .functional import softmax_, target_grad_
from .head import LogitTransform

#: the weight keys of preference terms (per-token markers made by the model).
PAIRS, SEQUENCES, CHOSEN_TOKENS = "pairs", "sequences", "chosen_tokens"
#: the batch field holding the reference log-probabilities (one per sequence).
REF_FIELD = "ref_logps"


# per-token log-probabilities, chunked --------------------------------------------------------
class _TargetLogps(torch.autograd.Function):
    """``log softmax(h W^T + b)[y]`` per token, a chunk of logits at a time.

    The gradient of a sequence-level loss is not known until the whole sequences are, so
    backward recomputes each chunk's logits (one extra matmul) instead of keeping them:
    ``d logp_t / d z_t = onehot(y_t) - softmax(z_t)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, step):
        dtype = torch.promote_types(weight.dtype, torch.float32)
        out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        for start in range(0, hidden.shape[0], step):
            logits = _chunk_logits(hidden[start : start + step], weight, bias)
            target = logits.gather(1, targets[start : start + step, None]).squeeze(1)
            out[start : start + step] = target - torch.logsumexp(logits, -1)
            del logits
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.step = step
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        compute = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros_like(weight, dtype=compute) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=compute) if need_b and bias is not None else None
        step = ctx.step
        for start in range(0, hidden.shape[0], step):
            h = hidden[start : start + step]
            probs = _chunk_logits(h, weight, bias)
            softmax_(probs)
            # -g * (p - onehot) = g * (onehot - p)
            scale = -grad_out[start : start + step].to(probs.dtype)
            grad = target_grad_(probs, targets[start : start + step], scale)
            if grad_h is not None:
                grad_h[start : start + step] = (grad @ weight.to(compute)).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(grad.t(), h.to(compute))
            if grad_b is not None:
                grad_b.add_(grad.sum(0))
            del probs, grad
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Float32 (or float64) logits of a chunk, computed in the head's dtype."""
    logits = F.linear(hidden.to(weight.dtype), weight, bias)
    return logits.to(torch.promote_types(weight.dtype, torch.float32))


def chunked_target_logps(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int = 256
) -> Tensor:
    """Log-probability of each target token, differentiable, one chunk of logits at a time.

    Args:
        hidden: ``[n, D]`` hidden states of the tokens that have a target.
        weight: ``[V, D]`` output head weight; ``bias``: ``[V]`` or None.
        targets: ``[n]`` target ids.
        chunk_size: tokens per chunk of ``[chunk x V]`` float logits (the extra memory is
            about two such chunks plus the head's gradient); 0 computes all at once.

    Returns:
        ``[n]`` float32 log-probabilities (float64 for a float64 head).
    """
    check_targets(targets, weight.shape[0], "preference loss")
    if hidden.shape[0] == 0:
        # Keep a graph to the inputs so every parameter still gets a (zero) gradient.
        return (hidden.sum(-1) * 0 + weight.reshape(-1)[:1].sum() * 0).float()
    step = chunk_size or hidden.shape[0]
    return _TargetLogps.apply(hidden, weight, bias, targets, step)


# sequences of a batch ------------------------------------------------------------------------
def answer_index(labels: Tensor) -> tuple[Tensor, int]:
    """The answer each target token belongs to: answers are the runs of targets.

    Preference data labels only the answer of each sequence, and the shift leaves no target
    on the last token of a packed document, so every sequence (a row, or a document of a
    packed row) holds exactly one run of consecutive targets: run ``k`` is sequence ``k``,
    numbered row-major; even runs are chosen answers, odd ones rejected.

    Args:
        labels: ``[B, S]`` targets of the whole batch (before any sequence-parallel split).

    Returns:
        (``[B, S]`` long run ids, -1 where there is no target; the number of runs).
    """
    valid = labels != IGNORE_INDEX
    starts = valid.clone()
    starts[:, 1:] &= ~valid[:, :-1]
    run = torch.cumsum(starts.reshape(-1).long(), 0).reshape(labels.shape) - 1
    return torch.where(valid, run, torch.full_like(run, -1)), int(starts.sum())


def _run_starts(labels: Tensor, weights: Tensor) -> Tensor:
    run, _ = answer_index(labels)
    first = run >= 0
    first[:, 1:] &= run[:, 1:] != run[:, :-1]
    return first


def pair_markers(labels: Tensor, weights: Tensor) -> Tensor:
    """1 at the first target of each chosen answer: the markers sum to the pair count."""
    run, _ = answer_index(labels)
    return (_run_starts(labels, weights) & (run % 2 == 0)).to(weights)


def sequence_markers(labels: Tensor, weights: Tensor) -> Tensor:
    """1 at the first target of each answer: the markers sum to the sequence count."""
    return _run_starts(labels, weights).to(weights)


def chosen_token_markers(labels: Tensor, weights: Tensor) -> Tensor:
    """1 at each target of a chosen answer."""
    run, _ = answer_index(labels)
    return ((run >= 0) & (run % 2 == 0)).to(weights)


#: how the markers whose sums normalise preference terms are made (per-token weights, so
#: they are split with the labels under sequence parallel and summed over accumulation
#: windows and ranks like token counts).
PREFERENCE_WEIGHTS = {
    PAIRS: WeightSpec("token", scale=pair_markers, use_loss_weight=False),
    SEQUENCES: WeightSpec("token", scale=sequence_markers, use_loss_weight=False),
    CHOSEN_TOKENS: WeightSpec("token", scale=chosen_token_markers, use_loss_weight=False),
}


def sequence_logps(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    labels: Tensor,
    seq: Tensor,
    n_seqs: int,
    chunk_size: int = 256,
    transform: LogitTransform | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Summed target log-probabilities per sequence, for this shard's tokens.

    Args:
        hidden: ``[B, S, D]`` final hidden states; with ``weight=None`` (the model's own
            logits, ``head='model'``) the logits ``[B, S, V]`` themselves.
        seq: ``[B, S]`` sequence ids of the tokens (:func:`answer_index`).
        transform: the head's post-processing of its logits (soft cap, multipliers). A head
            with one gets its logits all at once (exact, not memory-saving).

    Returns:
        (``[n_seqs]`` sums of log-probs, ``[n_seqs]`` target-token counts, ``[n]`` the
        per-token log-probs of the valid tokens, in order).
    """
    valid = labels != IGNORE_INDEX
    if weight is None or (transform is not None and not transform.is_identity):
        logits = hidden[valid] if weight is None else F.linear(hidden[valid], weight, bias)
        logits = (logits if transform is None else transform(logits)).float()
        logps = logits.log_softmax(-1).gather(1, labels[valid][:, None]).squeeze(1)
    else:
        logps = chunked_target_logps(hidden[valid], weight, bias, labels[valid], chunk_size)
    ids = seq[valid]
    sums = torch.zeros(n_seqs, dtype=logps.dtype, device=logps.device).index_add(0, ids, logps)
    counts = torch.zeros(n_seqs, dtype=logps.dtype, device=logps.device)
    counts.index_add_(0, ids, torch.ones_like(logps))
    return sums, counts, logps


@dataclass
class PairStats:
    """Per-sequence quantities of a batch, split into chosen (``c``) and rejected (``r``).

    Attributes:
        chosen, rejected: policy log-probabilities (summed, or averaged per token when the
            loss asks for averages) or reward scores, ``[n_pairs]`` each.
        ref_chosen, ref_rejected: the reference's, same reduction; None without reference.
        chosen_tokens, rejected_tokens: target-token counts, ``[n_pairs]``.
    """

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None

    @property
    def chosen_logratios(self) -> Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> Tensor:
        return self.rejected - self.ref_rejected

    @property
    def margin(self) -> Tensor:
        """``(pi_c - pi_r) - (ref_c - ref_r)``, the DPO logit before ``beta``."""
        return self.chosen_logratios - self.rejected_logratios


# base classes --------------------------------------------------------------------------------
class PreferenceLoss(BaseLoss):
    """Base of the preference losses: finds the sequences and completes their sums.

    Subclasses implement :meth:`compute` from per-sequence statistics.

    Args:
        beta: the temperature of the implicit reward (its meaning per loss is in each
            class's docstring).
        chunk_size: tokens per chunk of vocabulary-sized float32 logits (about two chunks
            exist at a time: 256 x 128k x 4 bytes = 128 MiB each); 0 computes all at once.
        name: the term name (``loss_<name>``).
        nonfinite: ``'raise'`` or ``'skip'`` (see :class:`BaseLoss`).
    """

    default_name = "pref"
    required_fields = {
        "labels": "the preference data set (xtuner.dataset.preference_dataset."
        "build_preference_dataset) with preference_collate_fn"
    }
    #: whether the loss reads the reference model's log-probabilities.
    needs_reference: bool = False
    #: average the log-probabilities over each sequence's target tokens (IPO, SimPO, ORPO).
    average_logps: bool = False
    #: the answers come in (chosen, rejected) pairs (all but unpaired KTO).
    paired: bool = True

    def __init__(
        self,
        beta: float = 0.1,
        chunk_size: int | None = 256,
        name: str | None = None,
        nonfinite: str = "raise",
    ):
        super().__init__(name=name, nonfinite=nonfinite)
        if beta <= 0:
            raise ValueError(f"{type(self).__name__}: beta must be > 0, got {beta}")
        self.beta = float(beta)
        self.chunk_size = chunk_size or 0

    @property
    def weight_key(self) -> str:
        return PAIRS

    def weight_specs(self) -> dict[str, WeightSpec]:
        return dict(PREFERENCE_WEIGHTS)

    @property
    def seq_key(self) -> str:
        return f"{self.name}.seq"

    @property
    def count_key(self) -> str:
        return f"{self.name}.n_seqs"

    def extra_inputs(self, batch: dict[str, Any], labels: Tensor) -> dict[str, Tensor]:
        """The sequence id of every token and the batch's sequence count (both split like
        the labels under sequence parallel; the count is the same everywhere)."""
        self.check_fields(batch)
        if self.needs_reference and batch.get(REF_FIELD) is None:
            raise LossInputError(
                f"{type(self).__name__} (loss '{self.name}') needs the reference model's "
                f"log-probabilities ('{REF_FIELD}' in the batch): train it with "
                "xtuner.model.dpo.DPO, which computes them (or set ref_llm / "
                "precompute_ref_log_probs there), or use a reference-free loss "
                "(SimPOLoss, CPOLoss, ORPOLoss)"
            )
        seq, n_seqs = answer_index(labels)
        if self.paired and n_seqs % 2:
            raise LossInputError(
                f"{type(self).__name__}: the batch holds {n_seqs} answers (runs of labelled "
                "tokens), not chosen/rejected pairs; build the data with "
                "xtuner.dataset.preference_dataset.build_preference_dataset and "
                "preference_collate_fn"
            )
        ref = batch.get(REF_FIELD)
        if ref is not None and ref.numel() != n_seqs:
            raise LossInputError(
                f"{type(self).__name__}: '{REF_FIELD}' holds {ref.numel()} values for "
                f"{n_seqs} answers"
            )
        return {self.seq_key: seq, self.count_key: torch.full_like(seq, n_seqs)}

    def sequences(self, ctx: LossContext) -> tuple[Tensor, int]:
        """This shard's sequence ids and the batch's number of sequences (even: pairs)."""
        counts = ctx.extras[self.count_key]
        return ctx.extras[self.seq_key], int(counts.max()) if counts.numel() else 0

    def sequence_sums(self, ctx: LossContext) -> tuple[Tensor, Tensor, Tensor]:
        """Policy log-prob sums and token counts per sequence, over all shards.

        Several preference losses of one composite share one computation per context.
        """
        cache = ctx.__dict__.setdefault("_preference_cache", {})
        key = ("logps", self.chunk_size)
        if key not in cache:
            seq, n_seqs = self.sequences(ctx)
            sums, counts, token_logps = sequence_logps(
                ctx.hidden_states,
                ctx.head_weight,
                ctx.head_bias,
                ctx.labels,
                seq,
                n_seqs,
                self.chunk_size,
                ctx.logit_transform,
            )
            sums = sp_all_reduce_sum_with_grad(sums)
            counts = sp_all_reduce_sum_with_grad(counts.detach())
            cache[key] = (sums, counts, token_logps)
        return cache[key]

    def pair_stats(self, ctx: LossContext) -> PairStats:
        sums, counts, _ = self.sequence_sums(ctx)
        ref = ctx.batch.get(REF_FIELD)
        if ref is not None:
            ref = ref.to(sums)
        if self.average_logps:
            sums = sums / counts.clamp_min(1)
            ref = None if ref is None else ref / counts.clamp_min(1)
        stats = PairStats(sums[0::2], sums[1::2], chosen_tokens=counts[0::2])
        stats.rejected_tokens = counts[1::2]
        if ref is not None:
            stats.ref_chosen, stats.ref_rejected = ref[0::2], ref[1::2]
        return stats

    def pair_term(self, per_pair: Tensor) -> LossTerm:
        """A per-pair loss as a term normalised by the number of pairs.

        Every sequence-parallel rank holds the whole pairs' values; each contributes
        ``1/sp`` of the sum, and the all-reduce's backward hands each rank the gradient of
        the whole sum.
        """
        return LossTerm(per_pair.sum() / get_sequence_parallel_world_size(), PAIRS)

    def chosen_nll_term(self, ctx: LossContext, scale: float = 1.0) -> LossTerm:
        """``-sum log p`` over the chosen answers' tokens, normalised by their number."""
        _, _, token_logps = self.sequence_sums(ctx)
        seq = ctx.extras[self.seq_key][ctx.labels != IGNORE_INDEX]
        nll = -(token_logps * (seq % 2 == 0)).sum() * scale
        return LossTerm(nll, CHOSEN_TOKENS)

    def reward_metrics(self, chosen: Tensor, rejected: Tensor, stats: PairStats) -> dict:
        chosen, rejected = chosen.detach(), rejected.detach()
        return {
            "reward_acc": (chosen > rejected).float().mean(),
            "reward_margin": (chosen - rejected).mean(),
            "chosen_rewards": chosen.mean(),
            "rejected_rewards": rejected.mean(),
            "chosen_logps": stats.chosen.detach().mean(),
            "rejected_logps": stats.rejected.detach().mean(),
        }

    def compute(self, ctx: LossContext) -> tuple[dict[str, LossTerm], dict[str, Tensor]]:
        raise NotImplementedError(f"{type(self).__name__} must implement compute(ctx)")

    def forward(self, ctx: LossContext) -> LossOutput:
        terms, metrics = self.compute(ctx)
        return self.make_output(ctx, terms, metrics)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, beta={self.beta}, chunk_size={self.chunk_size}"


class PairwisePreferenceLoss(PreferenceLoss):
    """A loss of each (chosen, rejected) pair: implement :meth:`pair_loss`.

    The logged implicit rewards are ``beta * (pi - ref)`` with a reference, else
    ``beta * pi``.
    """

    def pair_loss(self, stats: PairStats) -> Tensor:
        """``[n_pairs]`` losses from the pairs' statistics."""
        raise NotImplementedError(f"{type(self).__name__} must implement pair_loss(stats)")

    def compute(self, ctx):
        stats = self.pair_stats(ctx)
        losses = self.pair_loss(stats)
        if stats.ref_chosen is not None:
            chosen, rejected = stats.chosen_logratios, stats.rejected_logratios
        else:
            chosen, rejected = stats.chosen, stats.rejected
        metrics = self.reward_metrics(self.beta * chosen, self.beta * rejected, stats)
        return {self.name: self.pair_term(losses)}, metrics


class _LabelSmoothed(PairwisePreferenceLoss):
    """A pairwise loss with TRL's ``label_smoothing`` (the assumed label-flip rate)."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, **kwargs):
        super().__init__(beta=beta, **kwargs)
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(
                f"{type(self).__name__}: label_smoothing must be in [0, 0.5), got {label_smoothing}"
            )
        self.label_smoothing = float(label_smoothing)

    def smoothed_sigmoid(self, logits: Tensor) -> Tensor:
        ls = self.label_smoothing
        return -F.logsigmoid(logits) * (1 - ls) - F.logsigmoid(-logits) * ls


# DPO and its variants ------------------------------------------------------------------------
@LOSSES.register_module()
class DPOLoss(_LabelSmoothed):
    """DPO (Rafailov et al., arXiv 2305.18290), ``loss_type='sigmoid'``.

    ``-(1-ls) log s(beta m) - ls log s(-beta m)`` with ``m = (pi_c - pi_r) - (ref_c - ref_r)``
    (label smoothing: conservative DPO, Mitchell 2023).
    """

    default_name = "dpo"
    needs_reference = True

    def pair_loss(self, stats):
        return self.smoothed_sigmoid(self.beta * stats.margin)


@LOSSES.register_module()
class RobustDPOLoss(_LabelSmoothed):
    """Robust DPO (Chowdhury et al., arXiv 2403.00409), ``'robust'``: unbiased under label
    noise ``ls``: ``(-(1-ls) log s(beta m) + ls log s(-beta m)) / (1 - 2 ls)``."""

    default_name = "dpo"
    needs_reference = True

    def pair_loss(self, stats):
        ls, logits = self.label_smoothing, self.beta * stats.margin
        return (-F.logsigmoid(logits) * (1 - ls) + F.logsigmoid(-logits) * ls) / (1 - 2 * ls)


@LOSSES.register_module()
class HingeDPOLoss(PairwisePreferenceLoss):
    """SLiC hinge (Zhao et al., arXiv 2305.10425), ``'hinge'``: ``relu(1 - beta m)``."""

    default_name = "dpo"
    needs_reference = True

    def pair_loss(self, stats):
        return torch.relu(1 - self.beta * stats.margin)


@LOSSES.register_module()
class IPOLoss(PairwisePreferenceLoss):
    """IPO (Azar et al., arXiv 2310.12036, eq. 17), ``'ipo'``: ``(m - 1/(2 beta))^2`` on
    log-probabilities averaged per token (as TRL and XTuner 0.x)."""

    default_name = "dpo"
    needs_reference = True
    average_logps = True

    def pair_loss(self, stats):
        return (stats.margin - 1 / (2 * self.beta)) ** 2


@LOSSES.register_module()
class KTOPairLoss(PairwisePreferenceLoss):
    """KTO on pairs (Ethayarajh et al., arXiv 2402.01306, HALOs eq. 7), ``'kto_pair'``.

    With ``a = pi_c - ref_c``, ``b = pi_r - ref_r`` and the reference points
    ``z_c = max(0, mean a)``, ``z_r = max(0, mean b)`` over the micro-batch:
    ``(1 - s(beta (a - z_r)) + 1 - s(beta (z_c - b))) / 2`` per pair (the mean over both
    halves, as TRL).
    """

    default_name = "dpo"
    needs_reference = True

    def pair_loss(self, stats):
        a, b = stats.chosen_logratios, stats.rejected_logratios
        z_c, z_r = a.mean().clamp(min=0), b.mean().clamp(min=0)
        return (2 - torch.sigmoid(self.beta * (a - z_r)) - torch.sigmoid(self.beta * (z_c - b))) / 2


@LOSSES.register_module()
class SPPOHardLoss(PairwisePreferenceLoss):
    """SPPO with hard labels (Wu et al., arXiv 2405.00675), ``'sppo_hard'``:
    ``(a - 1/(2 beta))^2 + (b + 1/(2 beta))^2``."""

    default_name = "dpo"
    needs_reference = True

    def pair_loss(self, stats):
        half = 0.5 / self.beta
        return (stats.chosen_logratios - half) ** 2 + (stats.rejected_logratios + half) ** 2


@LOSSES.register_module()
class NCAPairLoss(PairwisePreferenceLoss):
    """NCA (Chen et al., arXiv 2402.05369), ``'nca_pair'``:
    ``-log s(beta a) - log s(-beta a)/2 - log s(-beta b)/2``."""

    default_name = "dpo"
    needs_reference = True

    def pair_loss(self, stats):
        a, b = self.beta * stats.chosen_logratios, self.beta * stats.rejected_logratios
        return -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)


@LOSSES.register_module()
class EXOPairLoss(_LabelSmoothed):
    """EXO (Ji et al., arXiv 2402.00856), ``'exo_pair'``: the reverse KL between the
    policy's and the (smoothed) label distribution over the pair, with
    ``eps = label_smoothing`` (1e-3 when 0):
    ``s(x)(log s(x) - log(1-eps)) + s(-x)(log s(-x) - log eps)``, ``x = beta m``."""

    default_name = "dpo"
    needs_reference = True

    def pair_loss(self, stats):
        eps = self.label_smoothing or 1e-3
        x = self.beta * stats.margin
        return torch.sigmoid(x) * (F.logsigmoid(x) - math.log(1 - eps)) + torch.sigmoid(-x) * (
            F.logsigmoid(-x) - math.log(eps)
        )


@LOSSES.register_module()
class BCOPairLoss(PairwisePreferenceLoss):
    """BCO on pairs (Jung et al., arXiv 2404.04656), ``'bco_pair'``.

    With rewards ``r_c = beta a``, ``r_r = beta b`` and ``delta`` the running mean of all
    rewards seen so far (this micro-batch included; not trained through):
    ``-log s(r_c - delta) - log s(-(r_r - delta))``. The running mean is kept per process.
    """

    default_name = "dpo"
    needs_reference = True

    def __init__(self, beta: float = 0.1, **kwargs):
        super().__init__(beta=beta, **kwargs)
        self.register_buffer("running_mean", torch.zeros((), dtype=torch.float64), persistent=True)
        self.register_buffer("running_count", torch.zeros((), dtype=torch.float64), persistent=True)

    def pair_loss(self, stats):
        r_c, r_r = self.beta * stats.chosen_logratios, self.beta * stats.rejected_logratios
        rewards = torch.cat([r_c, r_r]).detach().double()
        if self.training:
            count = self.running_count + rewards.numel()
            self.running_mean += (rewards.mean() - self.running_mean) * rewards.numel() / count
            self.running_count.copy_(count)
        delta = self.running_mean.to(r_c)
        return -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))


@LOSSES.register_module()
class AOTLoss(_LabelSmoothed):
    """AOT (Melnyk et al., arXiv 2406.05882), ``'aot'``: distributional alignment through
    sorting: the sorted policy log-ratios ``pi_c - pi_r`` minus the sorted reference ones,
    ``x = beta (sort(pi_c - pi_r) - sort(ref_c - ref_r))``, in the smoothed sigmoid loss.
    ``paired=False`` is TRL's ``'aot_pair'``: ``x = beta (sort(a) - sort(b))``."""

    default_name = "dpo"
    needs_reference = True

    def __init__(self, beta: float = 0.1, paired: bool = False, **kwargs):
        super().__init__(beta=beta, **kwargs)
        self.paired = paired

    def pair_loss(self, stats):
        if self.paired:
            first, second = stats.chosen_logratios, stats.rejected_logratios
        else:
            first = stats.chosen - stats.rejected
            second = stats.ref_chosen - stats.ref_rejected
        delta = torch.sort(first, dim=0).values - torch.sort(second, dim=0).values
        return self.smoothed_sigmoid(self.beta * delta)


@LOSSES.register_module()
class APOZeroLoss(PairwisePreferenceLoss):
    """APO-zero (D'Oosterlinck et al., arXiv 2408.06266), ``'apo_zero'``: push the chosen
    likelihood up and the rejected down: ``1 - s(beta a) + s(beta b)``."""

    default_name = "dpo"
    needs_reference = True

    def pair_loss(self, stats):
        a, b = stats.chosen_logratios, stats.rejected_logratios
        return 1 - torch.sigmoid(self.beta * a) + torch.sigmoid(self.beta * b)


@LOSSES.register_module()
class APODownLoss(PairwisePreferenceLoss):
    """APO-down (arXiv 2408.06266), ``'apo_down'``: both likelihoods down, the rejected
    more: ``s(beta a) + 1 - s(beta (a - b))``."""

    default_name = "dpo"
    needs_reference = True

    def pair_loss(self, stats):
        a, b = stats.chosen_logratios, stats.rejected_logratios
        return torch.sigmoid(self.beta * a) + 1 - torch.sigmoid(self.beta * (a - b))


@LOSSES.register_module()
class SigmoidNormDPOLoss(PairwisePreferenceLoss):
    """Length-normalised DPO (TRL's ``'sigmoid_norm'``): the log-ratios divided by each
    answer's token count, ``-log s(beta (a / n_c - b / n_r))``."""

    default_name = "dpo"
    needs_reference = True

    def pair_loss(self, stats):
        a = stats.chosen_logratios / stats.chosen_tokens.clamp_min(1)
        b = stats.rejected_logratios / stats.rejected_tokens.clamp_min(1)
        return -F.logsigmoid(self.beta * (a - b))


#: XTuner 0.x / TRL ``loss_type`` -> registered loss name.
DPO_LOSS_TYPES = {
    "sigmoid": "DPOLoss",
    "robust": "RobustDPOLoss",
    "hinge": "HingeDPOLoss",
    "ipo": "IPOLoss",
    "kto_pair": "KTOPairLoss",
    "sppo_hard": "SPPOHardLoss",
    "nca_pair": "NCAPairLoss",
    "exo_pair": "EXOPairLoss",
    "bco_pair": "BCOPairLoss",
    "aot": "AOTLoss",
    "aot_pair": "AOTLoss",
    "apo_zero": "APOZeroLoss",
    "apo_down": "APODownLoss",
    "sigmoid_norm": "SigmoidNormDPOLoss",
}


# reference-free ------------------------------------------------------------------------------
@LOSSES.register_module()
class SimPOLoss(_LabelSmoothed):
    """SimPO (Meng et al., arXiv 2405.14734): no reference; average log-probabilities and a
    target margin ``gamma = gamma_beta_ratio * beta``:
    ``-log s(beta (avg_c - avg_r) - gamma)`` (label smoothing as in TRL's CPOTrainer)."""

    default_name = "simpo"
    average_logps = True

    def __init__(self, beta: float = 2.0, gamma_beta_ratio: float = 0.5, **kwargs):
        super().__init__(beta=beta, **kwargs)
        self.gamma_beta_ratio = float(gamma_beta_ratio)

    def pair_loss(self, stats):
        return self.smoothed_sigmoid(
            self.beta * (stats.chosen - stats.rejected - self.gamma_beta_ratio)
        )


@LOSSES.register_module()
class ChosenNLLLoss(PreferenceLoss):
    """Negative log-likelihood of the chosen answers (token mean), the SFT term of RPO
    (Pang et al., arXiv 2404.19733) and MPO; ``beta`` is unused."""

    default_name = "nll"

    def compute(self, ctx):
        return {self.name: self.chosen_nll_term(ctx)}, {}


@LOSSES.register_module()
class CPOLoss(_LabelSmoothed):
    """CPO (Xu et al., arXiv 2401.08417): no reference:
    ``-log s(beta (pi_c - pi_r))`` per pair plus ``alpha`` x the chosen answers' NLL
    (token mean), logged as ``loss_<name>`` and ``loss_nll``."""

    default_name = "cpo"

    def __init__(self, beta: float = 0.1, alpha: float = 1.0, **kwargs):
        super().__init__(beta=beta, **kwargs)
        self.alpha = float(alpha)

    def term_names(self) -> list[str]:
        return [self.name, "nll"] if self.alpha else [self.name]

    def pair_loss(self, stats):
        return self.smoothed_sigmoid(self.beta * (stats.chosen - stats.rejected))

    def compute(self, ctx):
        terms, metrics = super().compute(ctx)
        if self.alpha:
            terms["nll"] = self.chosen_nll_term(ctx, self.alpha)
        return terms, metrics


@LOSSES.register_module()
class ORPOLoss(PreferenceLoss):
    """ORPO (Hong et al., arXiv 2403.07691): the chosen answers' NLL (token mean) plus
    ``beta`` x the odds-ratio term ``-log s(log odds_c - log odds_r)`` with
    ``log odds = avg - log(1 - exp(avg))`` on per-token average log-probabilities. Logged as
    ``loss_nll`` and ``loss_<name>``; metrics include ``log_odds_ratio`` and
    ``log_odds_chosen``."""

    default_name = "or"
    average_logps = True

    def term_names(self) -> list[str]:
        return ["nll", self.name]

    def compute(self, ctx):
        stats = self.pair_stats(ctx)
        log_odds = (stats.chosen - stats.rejected) - (
            torch.log1p(-torch.exp(stats.chosen)) - torch.log1p(-torch.exp(stats.rejected))
        )
        ratio = F.logsigmoid(log_odds)
        metrics = self.reward_metrics(self.beta * stats.chosen, self.beta * stats.rejected, stats)
        metrics["log_odds_ratio"] = ratio.detach().mean()
        metrics["log_odds_chosen"] = log_odds.detach().mean()
        terms = {"nll": self.chosen_nll_term(ctx), self.name: self.pair_term(-self.beta * ratio)}
        return terms, metrics


@LOSSES.register_module()
class KTOLoss(PreferenceLoss):
    """Unpaired KTO (Ethayarajh et al., arXiv 2402.01306): each sequence is desirable or
    undesirable on its own. With ``r = pi - ref`` and the reference point
    ``z = max(0, mean r)`` over the micro-batch's sequences (not trained through):
    desirable ``lambda_D (1 - s(beta (r - z)))``, undesirable ``lambda_U (1 - s(beta (z - r)))``,
    normalised by the number of sequences. Desirability comes from the batch field
    ``kto_labels`` (one bool per sequence: unpaired data, ``completion`` + ``label`` records,
    makes it) when present, else chosen answers are desirable and rejected ones undesirable.
    """

    default_name = "kto"
    needs_reference = True
    paired = False

    def __init__(
        self,
        beta: float = 0.1,
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(beta=beta, **kwargs)
        self.desirable_weight = float(desirable_weight)
        self.undesirable_weight = float(undesirable_weight)

    @property
    def weight_key(self) -> str:
        return SEQUENCES

    def compute(self, ctx):
        sums, _, _ = self.sequence_sums(ctx)
        ratio = sums - ctx.batch[REF_FIELD].to(sums)
        labels = ctx.batch.get("kto_labels")
        if labels is None:
            desirable = torch.arange(ratio.numel(), device=ratio.device) % 2 == 0
        else:
            desirable = torch.as_tensor(labels, device=ratio.device).bool().reshape(-1)
            if desirable.numel() != ratio.numel():
                raise LossInputError(
                    f"KTOLoss: 'kto_labels' holds {desirable.numel()} labels for "
                    f"{ratio.numel()} answers"
                )
        z = ratio.detach().mean().clamp(min=0)
        good = self.desirable_weight * (1 - torch.sigmoid(self.beta * (ratio - z)))
        bad = self.undesirable_weight * (1 - torch.sigmoid(self.beta * (z - ratio)))
        losses = torch.where(desirable, good, bad)
        rewards = (self.beta * ratio).detach()
        metrics = {
            "kl": z,
            "chosen_rewards": _masked_mean(rewards, desirable),
            "rejected_rewards": _masked_mean(rewards, ~desirable),
        }
        value = losses.sum() / get_sequence_parallel_world_size()
        return {self.name: LossTerm(value, SEQUENCES)}, metrics


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


# reward models -------------------------------------------------------------------------------
PENALTIES = ("log_barrier", "L2", "none")


class _RewardRankingLoss(PreferenceLoss):
    """Pairwise ranking of reward scores plus a penalty that keeps the scores bounded.

    The score of a sequence is the value head (the context's head, ``[1, D]``) applied to
    the hidden state of its reward token (the one position with a label). Terms:
    ``loss_<name>`` (the ranking loss per pair) and ``loss_penalty`` (``penalty_weight`` x
    the penalty of both scores of a pair), both normalised by the number of pairs.

    Args:
        penalty_type: ``'log_barrier'`` (``-log(u - s) - log(s - l)`` with the score clamped
            to ``[l + 1e-3, u - 1e-3]``, ``l, u = -5, 5``; InternLM2, arXiv 2403.17297),
            ``'L2'`` (``s^2``) or ``'none'``.
        penalty_weight: the penalty's weight.
    """

    default_name = "rank"
    lower_bound, upper_bound, epsilon = -5.0, 5.0, 1e-3

    def __init__(
        self,
        penalty_type: str = "log_barrier",
        penalty_weight: float = 0.01,
        name: str | None = None,
        nonfinite: str = "raise",
    ):
        super().__init__(beta=1.0, chunk_size=0, name=name, nonfinite=nonfinite)
        if penalty_type not in PENALTIES:
            raise ValueError(
                f"{type(self).__name__}: penalty_type={penalty_type!r} is not one of {PENALTIES}"
            )
        self.penalty_type = penalty_type
        self.penalty_weight = float(penalty_weight)

    def term_names(self) -> list[str]:
        return [self.name] + (["penalty"] if self.penalty_type != "none" else [])

    def scores(self, ctx: LossContext) -> Tensor:
        """``[n_seqs]`` reward scores (summed over each sequence's labelled positions)."""
        seq, n_seqs = self.sequences(ctx)
        valid = ctx.labels != IGNORE_INDEX
        hidden = ctx.hidden_states[valid].to(ctx.head_weight.dtype)
        compute = torch.promote_types(ctx.head_weight.dtype, torch.float32)
        values = F.linear(hidden, ctx.head_weight, ctx.head_bias)[:, 0].to(compute)
        scores = torch.zeros(n_seqs, dtype=values.dtype, device=values.device)
        scores = scores.index_add(0, seq[valid], values)
        return sp_all_reduce_sum_with_grad(scores)

    def penalty(self, scores: Tensor) -> Tensor:
        if self.penalty_type == "L2":
            return scores**2
        low, high = self.lower_bound, self.upper_bound
        clamped = scores.clamp(low + self.epsilon, high - self.epsilon)
        return -torch.log(high - clamped) - torch.log(clamped - low)

    def rank_loss(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        raise NotImplementedError

    def compute(self, ctx):
        scores = self.scores(ctx)
        chosen, rejected = scores[0::2], scores[1::2]
        terms = {self.name: self.pair_term(self.rank_loss(chosen, rejected))}
        if self.penalty_type != "none":
            per_pair = self.penalty(chosen) + self.penalty(rejected)
            terms["penalty"] = self.pair_term(self.penalty_weight * per_pair)
        metrics = {
            "reward_acc": (chosen > rejected).float().mean().detach(),
            "reward_margin": (chosen - rejected).mean().detach(),
            "chosen_score_mean": chosen.mean().detach(),
            "rejected_score_mean": rejected.mean().detach(),
        }
        return terms, metrics

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, penalty_type={self.penalty_type!r}, "
            f"penalty_weight={self.penalty_weight}"
        )


@LOSSES.register_module()
class RankingRewardLoss(_RewardRankingLoss):
    """Bradley-Terry ranking of reward scores: ``-log s(s_c - s_r)`` (InstructGPT,
    arXiv 2203.02155)."""

    def rank_loss(self, chosen, rejected):
        return -F.logsigmoid(chosen - rejected)


@LOSSES.register_module()
class FocalRankingRewardLoss(_RewardRankingLoss):
    """Focal ranking (InternLM2, arXiv 2403.17297): ``(1 - p)^gamma (-log s(s_c - s_r))`` with
    ``p = 2 relu(s(s_c - s_r) - 1/2)``, so well-ranked pairs weigh less.

    Args:
        gamma: the focusing exponent (2 in the paper and XTuner 0.x).
        **kwargs: ``penalty_type``, ``penalty_weight``, ``name``, ``nonfinite``.
    """

    def __init__(self, gamma: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.gamma = float(gamma)

    def rank_loss(self, chosen, rejected):
        diff = chosen - rejected
        p = 2 * torch.relu(torch.sigmoid(diff) - 0.5)
        return (1 - p) ** self.gamma * -F.logsigmoid(diff)


#: XTuner 0.x RewardModel ``loss_type`` -> registered loss name.
REWARD_LOSS_TYPES = {"ranking": "RankingRewardLoss", "focal": "FocalRankingRewardLoss"}


def preference_losses(loss: BaseLoss) -> list[PreferenceLoss]:
    """The preference losses inside ``loss`` (itself, or the parts of a composite)."""
    return [m for m in loss.modules() if isinstance(m, PreferenceLoss)]
