"""finalize_loss: logged values, the NaN/Inf policy, metrics."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from xtuner.model.losses import (
    CompositeLoss,
    CrossEntropyLoss,
    LossContext,
    TokenLoss,
    compute_weights,
    finalize_loss,
)
from xtuner.model.losses.base import LossOutput, LossTerm

from .reference import grads, make_case, run_loss, total


class NaNOnTarget(TokenLoss):
    """NaN for every token whose target is ``bad_id`` (0 otherwise)."""

    default_name = "bad"

    def __init__(self, bad_id: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.bad_id = bad_id

    def token_loss(self, logits, targets, extras):
        nan = torch.where(targets == self.bad_id, float("nan"), 0.0).to(logits)
        return logits.logsumexp(-1) * 0 + nan


def _case_with_target(bad_id=0):
    case = make_case("padded", torch.float32)
    case.labels[0, 3] = bad_id
    return case


def test_raise_names_the_term_and_the_iteration():
    loss = CompositeLoss([CrossEntropyLoss(), NaNOnTarget()])
    with pytest.raises(
        FloatingPointError, match="'loss_bad' = nan at iteration 7.*nonfinite='skip'"
    ):
        run_loss(loss, _case_with_target(), iteration=7)


def test_skip_drops_the_term_and_keeps_training_the_others():
    # Different chunk sizes: separate passes, so only the bad term is dropped.
    loss = CompositeLoss(
        [CrossEntropyLoss(chunk_size=4), NaNOnTarget(chunk_size=8, nonfinite="skip")]
    )
    case = _case_with_target()
    with mock.patch("xtuner.model.losses.normalize.print_log") as log:
        result = run_loss(loss, case, iteration=3)
    message = log.call_args.args[0]
    assert "'loss_bad' = nan at iteration 3: skipped for this step" in message
    assert result["loss_bad"].item() == 0.0
    value = total(result)
    expected = total(run_loss(CrossEntropyLoss(chunk_size=4), case))
    torch.testing.assert_close(value.detach(), expected.detach())
    for got, want in zip(grads(value, case), grads(expected, case)):
        torch.testing.assert_close(got, want)


def test_skip_drops_terms_computed_in_the_same_pass():
    loss = CompositeLoss([CrossEntropyLoss(nonfinite="skip"), NaNOnTarget(nonfinite="skip")])
    case = _case_with_target()
    with mock.patch("xtuner.model.losses.normalize.print_log") as log:
        result = run_loss(loss, case, iteration=5)
    assert "with ['loss_ce'], computed in the same pass" in log.call_args.args[0]
    value = total(result)
    assert value.item() == 0.0
    gradients = grads(value, case)  # still reaches every input, with zeros
    assert all(bool((g == 0).all()) for g in gradients)


def test_a_full_loss_term_with_its_own_denominator():
    value = torch.tensor(6.0, requires_grad=True)
    output = LossOutput({"pairs": LossTerm(value, denominator=torch.tensor(3.0))})
    result = finalize_loss(output, {})
    assert result["loss"].item() == 2.0
    result["loss"].backward()
    assert value.grad.item() == pytest.approx(1 / 3)


def test_global_denominator_sets_the_gradient_not_the_logged_value():
    case = make_case("packed")
    loss = CrossEntropyLoss()
    weights = compute_weights(loss.weight_specs(), case.labels, case.position_ids)
    ctx = LossContext(case.hidden, case.weight, None, case.labels, weights)
    local = finalize_loss(loss(ctx), weights)
    den = weights["token"].sum() * 4  # e.g. four micro-batches of this size in the window
    scaled = finalize_loss(loss(ctx), weights, {"token": den})
    torch.testing.assert_close(scaled["loss"], local["loss"])
    for got, want in zip(grads(scaled["loss"], case), grads(local["loss"] / 4, case)):
        torch.testing.assert_close(got, want)


def test_a_metric_named_like_a_loss_is_rejected():
    output = LossOutput({"x": LossTerm(torch.tensor(1.0), denominator=torch.tensor(1.0))})
    output.metrics["my_loss_metric"] = torch.tensor(1.0)
    with pytest.raises(ValueError, match="contains 'loss'"):
        finalize_loss(output, {})


def test_skip_with_inf_in_the_first_hidden_state_gives_exact_zeros():
    # The zero anchor must not be hidden[0] * 0 (inf * 0 is NaN).
    case = make_case("padded", torch.float32)
    with torch.no_grad():
        case.hidden[0, 0, 0] = float("inf")  # the first element (a prompt token)
        case.hidden[0, 3, 1] = float("inf")  # a token with a target: the loss is NaN
    with mock.patch("xtuner.model.losses.normalize.print_log"):
        result = run_loss(CrossEntropyLoss(nonfinite="skip", chunk_size=4), case)
    value = total(result)
    assert value.item() == 0.0
    gradients = grads(value, case)
    assert all(bool((g == 0).all()) for g in gradients)


def test_zero_global_denominator_contributes_zero():
    # A whole accumulation window without a valid token: the term is 0, its gradient 0.
    case = make_case("padded", torch.float32)
    case.labels[:] = -100
    loss = CrossEntropyLoss()
    weights = compute_weights(loss.weight_specs(), case.labels, case.position_ids)
    ctx = LossContext(case.hidden, case.weight, None, case.labels, weights)
    result = finalize_loss(loss(ctx), weights, {"token": torch.zeros((), dtype=torch.float64)})
    assert result["loss"].item() == 0.0
    assert all(bool((g == 0).all()) for g in grads(result["loss"], case))


def test_double_backward_raises_a_clear_error():
    case = make_case("padded", torch.float32)
    value = total(run_loss(CrossEntropyLoss(), case))
    with pytest.raises(RuntimeError, match="cannot be differentiated twice.*create_graph=True"):
        torch.autograd.grad(value, case.hidden, create_graph=True)
    (grad_h,) = torch.autograd.grad(value, case.hidden)  # a plain backward still works
    assert bool(grad_h.isfinite().all())


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_gradient_is_computed_without_grad_mode(mode):
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (
                torch.ops.aten.mm.default,
                torch.ops.aten.mm.out,
                torch.ops.aten.addmm_.default,
            ):
                CountMatmuls.count += 1
            return func(*args, **(kwargs or {}))

    case = make_case("padded", torch.float32)
    n_chunks = -(-int((case.labels != -100).sum()) // 4)
    with mode(), CountMatmuls():
        result = run_loss(CrossEntropyLoss(chunk_size=4), case)
    assert not result["loss"].requires_grad
    assert CountMatmuls.count == n_chunks  # the logits only: no gradient GEMM


def test_own_denominator_term_under_sequence_parallel():
    # Two shards of one sequence hold 2 and 4 of a sum normalised by 3: the logged value is
    # (2 + 4) / 3 and each shard's gradient is sp / 3 (DDP then averages over the 2 ranks).
    value = torch.tensor(2.0, requires_grad=True)
    output = LossOutput({"pairs": LossTerm(value, denominator=torch.tensor(3.0))})
    with (
        mock.patch(
            "xtuner.model.losses.normalize.get_sequence_parallel_world_size", return_value=2
        ),
        mock.patch(
            "xtuner.model.losses.normalize.sp_all_reduce_sum", side_effect=lambda t: t + 4.0
        ),
    ):
        result = finalize_loss(output, {})
    assert result["loss"].item() == pytest.approx(2.0)
    result["loss"].backward()
    assert value.grad.item() == pytest.approx(2 / 3)
