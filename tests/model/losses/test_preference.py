"""Preference losses against naive implementations (TRL's formulas) written here.

Each case builds a micro-batch of chosen/rejected sequences as the preference model hands it
to the loss (hidden states, a head, shifted labels, reference log-probabilities in the batch),
and compares the loss's value and its gradients w.r.t. the hidden states and the head with a
direct computation: full logits, ``log_softmax``, per-sequence sums, the formula.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xtuner.model.losses import LossContext, build_loss, compute_weights, finalize_loss
from xtuner.model.losses.base import LossInputError
from xtuner.model.losses.preference import (
    DPO_LOSS_TYPES,
    answer_index,
    chunked_target_logps,
)

IGNORE = -100
LS = 0.1


@pytest.fixture(autouse=True)
def logits_layout():
    """Overrides the package's two-layout fixture: these losses do not use the chunk layouts."""
    return "row_major"


def make_batch(layout: str, vocab: int = 11, dim: int = 5, seed: int = 0, pairs: int = 3):
    """Hidden states, head and shifted labels of ``pairs`` pairs: one answer per row
    (``'padded'``) or all answers packed in one row (``'packed'``)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [int(torch.randint(4, 8, (1,), generator=gen)) for _ in range(2 * pairs)]
    prompts = [int(torch.randint(1, 3, (1,), generator=gen)) for _ in lengths]
    if layout == "padded":
        seq = max(lengths) + 1
        labels = torch.full((2 * pairs, seq), IGNORE)
        position_ids = torch.arange(seq).expand(2 * pairs, seq).clone()
        for i, (n, p) in enumerate(zip(lengths, prompts)):
            labels[i, p : n - 1] = torch.randint(0, vocab, (n - 1 - p,), generator=gen)
    else:
        total = sum(lengths)
        labels = torch.full((1, total), IGNORE)
        position_ids = torch.zeros(1, total, dtype=torch.long)
        start = 0
        for n, p in zip(lengths, prompts):
            labels[0, start + p : start + n - 1] = torch.randint(
                0, vocab, (n - 1 - p,), generator=gen
            )
            position_ids[0, start : start + n] = torch.arange(n)
            start += n
    hidden = torch.randn(*labels.shape, dim, generator=gen, dtype=torch.float64).requires_grad_()
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64).requires_grad_()
    ref = torch.randn(2 * pairs, generator=gen, dtype=torch.float64) * 3 - 10
    return hidden, weight, labels, position_ids, ref


def run_loss(loss, hidden, weight, labels, position_ids, ref, extra_batch=None):
    batch = {"labels": labels, "position_ids": position_ids, "ref_logps": ref}
    batch.update(extra_batch or {})
    weights = compute_weights(loss.weight_specs(), labels, position_ids)
    extras = loss.extra_inputs(batch, labels)
    ctx = LossContext(hidden, weight, None, labels, weights, extras, batch)
    out = finalize_loss(loss(ctx), weights)
    total = sum(v for k, v in out.items() if "loss" in k)
    grads = torch.autograd.grad(total, [hidden, weight])
    return out, total.detach(), grads


def naive_stats(hidden, weight, labels, position_ids):
    """Per-sequence summed log-probs and token counts from full logits."""
    logp = torch.log_softmax(hidden @ weight.T, -1)
    seq, n = answer_index(labels)
    sums = torch.zeros(n, dtype=logp.dtype)
    counts = torch.zeros(n, dtype=logp.dtype)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if labels[b, t] != IGNORE:
                sums = sums.index_add(0, seq[b, t : t + 1], logp[b, t, labels[b, t]][None])
                counts[seq[b, t]] += 1
    return sums, counts


def sig(x):
    return torch.sigmoid(x)


def logsig(x):
    return F.logsigmoid(x)


def smoothed(x, ls):
    return -logsig(x) * (1 - ls) - logsig(-x) * ls


BETA = 0.3


def naive_dpo(kind, pc, pr, rc, rr, nc, nr):
    """Per-pair losses of TRL's DPO loss types, written from the formulas."""
    b = BETA
    a_c, a_r = pc - rc, pr - rr
    m = (pc - pr) - (rc - rr)
    if kind == "sigmoid":
        return smoothed(b * m, LS)
    if kind == "robust":
        return (-logsig(b * m) * (1 - LS) + logsig(-b * m) * LS) / (1 - 2 * LS)
    if kind == "hinge":
        return torch.relu(1 - b * m)
    if kind == "ipo":
        mi = (pc / nc - pr / nr) - (rc / nc - rr / nr)
        return (mi - 1 / (2 * b)) ** 2
    if kind == "kto_pair":
        kl_c, kl_r = a_c.mean().clamp(min=0), a_r.mean().clamp(min=0)
        both = torch.cat([1 - sig(b * (a_c - kl_r)), 1 - sig(b * (kl_c - a_r))])
        return both.reshape(2, -1).mean(0)
    if kind == "sppo_hard":
        return (a_c - 0.5 / b) ** 2 + (a_r + 0.5 / b) ** 2
    if kind == "nca_pair":
        return -logsig(b * a_c) - 0.5 * logsig(-b * a_c) - 0.5 * logsig(-b * a_r)
    if kind == "exo_pair":
        x = b * m
        return sig(x) * (logsig(x) - math.log(1 - LS)) + sig(-x) * (logsig(-x) - math.log(LS))
    if kind == "bco_pair":
        delta = torch.cat([b * a_c, b * a_r]).mean().detach()
        return -logsig(b * a_c - delta) - logsig(-(b * a_r - delta))
    if kind == "aot":
        d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        return smoothed(b * d, LS)
    if kind == "aot_pair":
        d = torch.sort(a_c).values - torch.sort(a_r).values
        return smoothed(b * d, LS)
    if kind == "apo_zero":
        return 1 - sig(b * a_c) + sig(b * a_r)
    if kind == "apo_down":
        return sig(b * a_c) + 1 - sig(b * (a_c - a_r))
    if kind == "sigmoid_norm":
        return -logsig(b * (a_c / nc - a_r / nr))
    raise KeyError(kind)


def dpo_cfg(kind, chunk_size):
    cfg = dict(type=DPO_LOSS_TYPES[kind], beta=BETA, chunk_size=chunk_size)
    if kind in ("sigmoid", "robust", "exo_pair", "aot", "aot_pair"):
        cfg["label_smoothing"] = LS
    if kind == "aot_pair":
        cfg["paired"] = True
    return cfg


def check_against(naive_total, ours_total, ours_grads, leaves):
    naive_grads = torch.autograd.grad(naive_total, leaves, retain_graph=True)
    assert ours_total.item() == pytest.approx(naive_total.item(), rel=1e-10, abs=1e-12)
    for ours, ref in zip(ours_grads, naive_grads):
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(DPO_LOSS_TYPES))
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_dpo_family_matches_naive_values_and_gradients(kind, layout):
    hidden, weight, labels, pos, ref = make_batch(layout)
    loss = build_loss(dpo_cfg(kind, chunk_size=3))
    out, total, grads = run_loss(loss, hidden, weight, labels, pos, ref)
    sums, counts = naive_stats(hidden, weight, labels, pos)
    per_pair = naive_dpo(
        kind, sums[0::2], sums[1::2], ref[0::2], ref[1::2], *counts.reshape(-1, 2).T
    )
    check_against(per_pair.mean(), total, grads, [hidden, weight])
    # Metrics: implicit rewards of the log-ratios, named without "loss".
    avg = kind == "ipo"
    chosen = BETA * (sums[0::2] - ref[0::2]) / (counts[0::2] if avg else 1)
    rejected = BETA * (sums[1::2] - ref[1::2]) / (counts[1::2] if avg else 1)
    assert out["reward_acc"].item() == pytest.approx((chosen > rejected).double().mean().item())
    assert out["reward_margin"].item() == pytest.approx((chosen - rejected).mean().item())
    assert out["chosen_rewards"].item() == pytest.approx(chosen.mean().item())


def test_reference_free_losses_match_naive():
    hidden, weight, labels, pos, _ = make_batch("packed", seed=1)
    sums, counts = naive_stats(hidden, weight, labels, pos)
    avg = sums / counts
    chosen_nll = -sums[0::2].sum() / counts[0::2].sum()
    cases = {
        "SimPOLoss": (
            dict(beta=2.0, gamma_beta_ratio=0.4, label_smoothing=LS),
            smoothed(2.0 * (avg[0::2] - avg[1::2] - 0.4), LS).mean(),
        ),
        "CPOLoss": (
            dict(beta=BETA, alpha=0.7),
            (-logsig(BETA * (sums[0::2] - sums[1::2]))).mean() + 0.7 * chosen_nll,
        ),
        "ORPOLoss": (
            dict(beta=BETA),
            chosen_nll
            - BETA
            * logsig(
                (avg[0::2] - avg[1::2])
                - (torch.log1p(-torch.exp(avg[0::2])) - torch.log1p(-torch.exp(avg[1::2])))
            ).mean(),
        ),
        "ChosenNLLLoss": ({}, chosen_nll),
    }
    for name, (kwargs, naive) in cases.items():
        loss = build_loss(dict(type=name, chunk_size=4, **kwargs))
        out, total, grads = run_loss(loss, hidden, weight, labels, pos, None)
        check_against(naive, total, grads, [hidden, weight])
    assert set(out) >= {"loss"}


@pytest.mark.parametrize("labelled", [False, True])
def test_unpaired_kto_matches_naive(labelled):
    hidden, weight, labels, pos, ref = make_batch("padded", seed=2)
    desirable = torch.tensor([True, False, False, False, True, True]) if labelled else None
    loss = build_loss(dict(type="KTOLoss", beta=BETA, desirable_weight=1.5, undesirable_weight=0.5))
    extra = {"kto_labels": desirable} if labelled else None
    _, total, grads = run_loss(loss, hidden, weight, labels, pos, ref, extra)
    sums, _ = naive_stats(hidden, weight, labels, pos)
    r = sums - ref
    z = r.detach().mean().clamp(min=0)
    good = desirable if labelled else torch.arange(6) % 2 == 0
    per_seq = torch.where(good, 1.5 * (1 - sig(BETA * (r - z))), 0.5 * (1 - sig(BETA * (z - r))))
    check_against(per_seq.mean(), total, grads, [hidden, weight])


@pytest.mark.parametrize("kind", ["RankingRewardLoss", "FocalRankingRewardLoss"])
@pytest.mark.parametrize("penalty", ["log_barrier", "L2", "none"])
def test_reward_ranking_losses_match_naive(kind, penalty):
    gen = torch.Generator().manual_seed(3)
    n_seqs, length, dim = 6, 7, 5
    labels = torch.full((n_seqs, length), IGNORE)
    ends = [6, 4, 5, 6, 3, 6]
    for i, end in enumerate(ends):
        labels[i, end] = i % 2  # the reward token: 0 chosen, 1 rejected (XTuner 0.x)
    pos = torch.arange(length).expand(n_seqs, length)
    hidden = (
        torch.randn(n_seqs, length, dim, generator=gen, dtype=torch.float64) * 2
    ).requires_grad_()
    v_head = torch.randn(1, dim, generator=gen, dtype=torch.float64).requires_grad_()
    loss = build_loss(dict(type=kind, penalty_type=penalty, penalty_weight=0.05))
    out, total, grads = run_loss(loss, hidden, v_head, labels, pos, None)
    scores = torch.stack([hidden[i, end] @ v_head[0] for i, end in enumerate(ends)])
    c, r = scores[0::2], scores[1::2]
    rank = -logsig(c - r)
    if kind == "FocalRankingRewardLoss":
        rank = (1 - 2 * torch.relu(sig(c - r) - 0.5)) ** 2 * rank
    if penalty == "log_barrier":
        s = scores.clamp(-5 + 1e-3, 5 - 1e-3)
        pen = -torch.log(5 - s) - torch.log(s + 5)
    elif penalty == "L2":
        pen = scores**2
    else:
        pen = torch.zeros_like(scores)
    naive = rank.mean() + 0.05 * pen.reshape(-1, 2).sum(-1).mean()
    check_against(naive, total, grads, [hidden, v_head])
    assert out["reward_acc"].item() == pytest.approx((c > r).double().mean().item())


def test_mpo_and_rpo_lists_sum_their_terms_with_weights():
    hidden, weight, labels, pos, ref = make_batch("packed", seed=4)
    cfg = [
        dict(type="DPOLoss", beta=BETA, name="dpo"),
        dict(type="BCOPairLoss", beta=BETA, name="bco", loss_weight=0.5),
        dict(type="ChosenNLLLoss", loss_weight=0.25),
    ]
    out, total, grads = run_loss(build_loss(cfg), hidden, weight, labels, pos, ref)
    assert {"loss_dpo", "loss_bco", "loss_nll"} <= set(out)
    sums, counts = naive_stats(hidden, weight, labels, pos)
    args = (sums[0::2], sums[1::2], ref[0::2], ref[1::2], counts[0::2], counts[1::2])
    naive = (
        -logsig(BETA * ((args[0] - args[1]) - (args[2] - args[3]))).mean()
        + 0.5 * naive_dpo("bco_pair", *args).mean()
        + 0.25 * (-sums[0::2].sum() / counts[0::2].sum())
    )
    check_against(naive, total, grads, [hidden, weight])
    assert not any("loss" in k for k in out if k.startswith(("reward", "chosen", "rejected")))


def test_chunked_target_logps_equals_log_softmax_in_half_precision_and_float64():
    gen = torch.Generator().manual_seed(5)
    for dtype, tol in ((torch.float64, 1e-12), (torch.bfloat16, 2e-2)):
        hidden = torch.randn(9, 4, generator=gen).to(dtype).requires_grad_()
        weight = torch.randn(7, 4, generator=gen).to(dtype).requires_grad_()
        targets = torch.randint(0, 7, (9,), generator=gen)
        g = torch.randn(9, generator=gen)
        ours = chunked_target_logps(hidden, weight, None, targets, chunk_size=2)
        (ours * g.to(ours)).sum().backward()
        ours_grads = [hidden.grad, weight.grad]
        h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
        ref = torch.log_softmax(h @ w.T, -1).gather(1, targets[:, None]).squeeze(1)
        (ref * g.double()).sum().backward()
        torch.testing.assert_close(ours.double(), ref.detach(), rtol=tol, atol=tol)
        for a, b in zip(ours_grads, (h.grad, w.grad)):
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * 10)


def test_missing_reference_and_odd_sequences_are_refused_with_a_clear_message():
    hidden, weight, labels, pos, _ = make_batch("padded")
    with pytest.raises(LossInputError, match="reference model's log-probabilities"):
        run_loss(build_loss(dict(type="DPOLoss")), hidden, weight, labels, pos, None)
    loss = build_loss(dict(type="SimPOLoss"))
    with pytest.raises(LossInputError, match="5 answers"):
        run_loss(loss, hidden[:5], weight, labels[:5], pos[:5], None)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_loss(dict(type="DPOLoss", label_smoothing=0.5))
