"""Cross-entropy and its weighted variants against naive full-logits references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xtuner.model.losses import CrossEntropyLoss, SampleWeightedCELoss, TokenWeightedCELoss

from .reference import (
    assert_close_all,
    check_against,
    make_case,
    naive_weights,
    run_loss,
    total,
    weighted_mean,
)


def naive_ce(label_smoothing: float = 0.0):
    def fn(logits, targets):
        return F.cross_entropy(
            logits.transpose(1, 2), targets, reduction="none", label_smoothing=label_smoothing
        )

    return fn


def test_cross_entropy(layout, reduction, dtype):
    case = make_case(layout, dtype, bias=True)
    check_against(CrossEntropyLoss(reduction=reduction, chunk_size=3), naive_ce(), case, reduction)


def test_label_smoothing(layout, reduction, dtype):
    case = make_case(layout, dtype)
    loss = CrossEntropyLoss(label_smoothing=0.2, reduction=reduction, chunk_size=4)
    check_against(loss, naive_ce(0.2), case, reduction)


def test_default_equals_torch_mean_cross_entropy():
    case = make_case("packed", torch.float32)
    value = total(run_loss(CrossEntropyLoss(), case))
    logits = F.linear(case.hidden, case.weight)
    torch.testing.assert_close(value, F.cross_entropy(logits.transpose(1, 2), case.labels))


def test_class_weights_equal_torch_weighted_mean():
    case = make_case("padded", torch.float64)
    class_weight = [0.5 + 0.25 * (i % 5) for i in range(13)]
    value = total(run_loss(CrossEntropyLoss(class_weight=class_weight, chunk_size=2), case))
    logits = F.linear(case.hidden, case.weight)
    expected = F.cross_entropy(
        logits.transpose(1, 2), case.labels, weight=torch.tensor(class_weight, dtype=torch.float64)
    )
    torch.testing.assert_close(value, expected)
    got = torch.autograd.grad(value, case.leaves())
    want = torch.autograd.grad(expected, case.leaves())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_extra_ignore_index():
    case = make_case("padded", torch.float64)
    pad = 4
    loss = CrossEntropyLoss(ignore_index=pad, chunk_size=3)
    value = total(run_loss(loss, case))
    labels = case.labels.masked_fill(case.labels == pad, -100)
    logits = F.linear(case.hidden, case.weight)
    torch.testing.assert_close(value, F.cross_entropy(logits.transpose(1, 2), labels))
    assert loss.weight_key != "token"  # its own denominator


@pytest.mark.parametrize("normalize", ["weight", "tokens"])
def test_token_weighted(layout, reduction, dtype, normalize):
    case = make_case(layout, dtype, loss_weight=True)
    loss = TokenWeightedCELoss(normalize=normalize, reduction=reduction, chunk_size=3)
    result = run_loss(loss, case, loss.extra_inputs({"loss_weight": case.loss_weight}, None))
    value = total(result)
    ref = case.hidden.detach().double().requires_grad_(), case.weight.detach().double()
    ref[1].requires_grad_()
    per_token = naive_ce()(F.linear(*ref), case.labels.clamp_min(0))
    numerator = naive_weights(case.labels, case.position_ids, reduction, case.loss_weight)
    denominator = None
    if normalize == "tokens":
        denominator = naive_weights(case.labels, case.position_ids, reduction).sum()
    expected = weighted_mean(per_token, numerator, denominator)
    got = [value.detach(), *torch.autograd.grad(value, case.leaves())]
    assert_close_all(got, [expected.detach(), *torch.autograd.grad(expected, ref)])


def test_token_weighted_requires_the_field():
    with pytest.raises(ValueError, match="loss_weight"):
        TokenWeightedCELoss().extra_inputs({"input_ids": torch.zeros(1, 2)}, None)


def test_sample_weighted(layout, dtype):
    case = make_case(layout, dtype)
    check_against(SampleWeightedCELoss(chunk_size=2), naive_ce(), case, "sample")
    with pytest.raises(ValueError, match="'sample' or 'square'"):
        SampleWeightedCELoss(reduction="token")


def test_sample_weighted_with_per_sample_weights():
    case = make_case("packed", torch.float64, loss_weight=True)
    # One weight per document, as a record-level loss_weight gives.
    doc = torch.cumsum((case.position_ids == 0).long(), -1) + 10 * torch.arange(2)[:, None]
    case.loss_weight = (doc % 3 + 1).double()
    check_against(SampleWeightedCELoss(chunk_size=5), naive_ce(), case, "sample")
