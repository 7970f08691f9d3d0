"""Focal loss against a naive full-logits reference."""

from __future__ import annotations

import pytest
import torch

from xtuner.model.losses import FocalLoss

from .reference import check_against, grads, make_case, run_loss, total


def naive_focal(gamma: float, alpha=None):
    def fn(logits, targets):
        log_p = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        a = 1.0 if alpha is None else torch.as_tensor(alpha, dtype=logits.dtype)[targets]
        return -a * (1 - log_p.exp()) ** gamma * log_p

    return fn


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal(layout, reduction, dtype, gamma):
    case = make_case(layout, dtype, bias=True)
    loss = FocalLoss(gamma=gamma, reduction=reduction, chunk_size=3)
    check_against(loss, naive_focal(gamma), case, reduction)


def test_focal_alpha(layout, dtype):
    alpha = [0.25 * (1 + i % 4) for i in range(13)]  # exact in float32
    case = make_case(layout, dtype)
    check_against(
        FocalLoss(gamma=1.0, alpha=alpha, chunk_size=2), naive_focal(1.0, alpha), case, "token"
    )
    check_against(FocalLoss(gamma=2.0, alpha=0.5), naive_focal(2.0, [0.5] * 13), case, "token")


def test_focal_gradient_is_finite_when_a_token_is_certain():
    # gamma < 1: d(1-p)^gamma/dp is infinite at p = 1, where the naive autograd gives NaN;
    # the loss and the gradient of such a token are 0.
    case = make_case("padded", torch.float32)
    with torch.no_grad():
        case.hidden[..., 0] = 0
        case.hidden[0, 3, 0] = 10
        case.weight[:, 0] = 0
        case.weight[case.labels[0, 3], 0] = 1e4  # p_t == 1 exactly in float32
    loss = FocalLoss(gamma=0.5, chunk_size=4)
    value = total(run_loss(loss, case))
    gradients = grads(value, case)
    assert all(bool(g.isfinite().all()) for g in gradients)
    n = int((case.labels != -100).sum())
    case.labels[0, 3] = -100
    without = total(run_loss(loss, case))
    torch.testing.assert_close(value * n, without * (n - 1))
    for got, want in zip(gradients, grads(without * (n - 1) / n, case)):
        torch.testing.assert_close(got, want)


def test_focal_rejects_negative_gamma():
    with pytest.raises(ValueError, match="gamma"):
        FocalLoss(gamma=-1)
