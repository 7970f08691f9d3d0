"""CrossEntropyLoss(backend=...): how the Liger and Cut Cross-Entropy kernels are called.

The kernels are Triton code for CUDA, which CI has not. These tests put stand-ins with the
packages' own signatures (liger-kernel 0.8.5, cut-cross-entropy 25.1.1) in ``sys.modules``
and check this fork's side: which tokens and weights reach the kernel, the reduction asked
for, the sum and the gradients (against the naive full-logits reference), and the errors.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from xtuner.model.losses import (
    CompositeLoss,
    CrossEntropyLoss,
    LossInputError,
    SampleWeightedCELoss,
    TokenWeightedCELoss,
    ZLoss,
    backends,
)

from .reference import check_against, grads, make_case, run_loss, total
from .test_cross_entropy import naive_ce


@pytest.fixture
def kernels(monkeypatch):
    """Installs stand-in kernels; returns the list of calls they record."""
    calls: list[dict] = []

    def liger_fused_linear_cross_entropy(
        input,
        weight,
        target,
        bias=None,
        ce_weight=None,
        ignore_index=-100,
        lse_square_scale=0.0,
        label_smoothing=0.0,
        reduction="mean",
        softcap=None,
        return_z_loss=False,
        accum_dtype=None,
        use_token_scaling=False,
        return_token_accuracy=False,
        return_predicted_tokens=False,
        chunk_mem_const=1,
    ):
        calls.append(
            dict(kernel="liger", n=input.shape[0], reduction=reduction, bias=bias is not None)
        )
        logits = F.linear(input, weight, bias)
        return F.cross_entropy(
            logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing,
            reduction=reduction,
        )  # fmt: skip

    def linear_cross_entropy(
        e, c, targets, ignore_index=-100, softcap=None, reduction="mean", shift=False,
        filter_eps="high", impl="cce",
    ):  # fmt: skip
        calls.append(dict(kernel="cce", n=e.shape[0], reduction=reduction, filter_eps=filter_eps))
        return F.cross_entropy(e @ c.t(), targets, ignore_index=ignore_index, reduction=reduction)

    functional = types.ModuleType("liger_kernel.transformers.functional")
    functional.liger_fused_linear_cross_entropy = liger_fused_linear_cross_entropy
    cce = types.ModuleType("cut_cross_entropy")
    cce.linear_cross_entropy = linear_cross_entropy
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(
        sys.modules, "liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")
    )
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", functional)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", cce)
    monkeypatch.setattr(backends, "kernel_device_ok", lambda tensor: True)
    return calls


@pytest.mark.parametrize("backend", ["liger", "cce"])
def test_kernel_backends_match_the_reference(kernels, backend, layout, reduction):
    case = make_case(layout, torch.float64)
    loss = CrossEntropyLoss(reduction=reduction, backend=backend)
    check_against(loss, naive_ce(), case, reduction)
    n_valid = int((case.labels != -100).sum())
    # Only the valid tokens reach the kernel; 'sum' when every weight is 1.
    want = "sum" if reduction == "token" else "none"
    assert kernels == [dict(kernels[0], n=n_valid, reduction=want)]
    assert kernels[0]["kernel"] == backend
    if backend == "cce":
        assert kernels[0]["filter_eps"] is None  # exact gradients unless asked otherwise


@pytest.mark.parametrize("backend", ["liger", "cce"])
def test_kernel_backends_apply_token_weights(kernels, backend, layout):
    case = make_case(layout, torch.float64, loss_weight=True)
    for cls, kwargs in [(TokenWeightedCELoss, {}), (SampleWeightedCELoss, {})]:
        ours = cls(backend=backend, **kwargs)
        chunked = cls(chunk_size=3, **kwargs)
        a, b = total(run_loss(ours, case, {})), total(run_loss(chunked, case, {}))
        torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
        for ga, gb in zip(grads(a, case), grads(b, case)):
            torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-14)
    assert {call["reduction"] for call in kernels} == {"none"}


def test_liger_passes_bias_and_label_smoothing(kernels):
    case = make_case("packed", torch.float64, bias=True)
    check_against(
        CrossEntropyLoss(label_smoothing=0.1, backend="liger"), naive_ce(0.1), case, "token"
    )
    assert kernels[0]["bias"] is True


def test_auto_picks_an_installed_kernel_that_supports_the_options(kernels, monkeypatch):
    case = make_case("padded", torch.float64, bias=True)
    run_loss(CrossEntropyLoss(backend="auto"), case)
    assert [call["kernel"] for call in kernels] == ["liger"]
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", None)
    kernels.clear()
    run_loss(CrossEntropyLoss(backend="auto"), make_case("padded", torch.float64))
    assert [call["kernel"] for call in kernels] == ["cce"]
    kernels.clear()
    # cce has no bias: auto falls back to the chunked path.
    result = run_loss(CrossEntropyLoss(backend="auto"), case)
    assert kernels == [] and "acc" in result


def test_auto_off_the_gpu_is_the_chunked_path(kernels, monkeypatch):
    monkeypatch.setattr(backends, "kernel_device_ok", lambda tensor: tensor.is_cuda)
    case = make_case("padded", torch.float64)
    a = total(run_loss(CrossEntropyLoss(backend="auto"), case))
    b = total(run_loss(CrossEntropyLoss(), case))
    assert kernels == [] and torch.equal(a, b)


def test_explicit_backend_errors(kernels, monkeypatch):
    case = make_case("padded", torch.float64, bias=True)
    with pytest.raises(LossInputError, match="no output-head bias"):
        run_loss(CrossEntropyLoss(backend="cce"), case)
    with pytest.raises(LossInputError, match="no label smoothing"):
        run_loss(CrossEntropyLoss(backend="cce", label_smoothing=0.1), make_case("padded"))
    monkeypatch.setattr(backends, "kernel_device_ok", lambda tensor: tensor.is_cuda)
    with pytest.raises(LossInputError, match="CUDA tensors only.*backend='chunked'"):
        run_loss(CrossEntropyLoss(backend="liger"), case)
    monkeypatch.setitem(sys.modules, "cut_cross_entropy", None)
    with pytest.raises(ImportError, match="pip install cut-cross-entropy"):
        run_loss(CrossEntropyLoss(backend="cce"), make_case("padded"))
    with pytest.raises(ValueError, match="backend='triton' is not one of"):
        CrossEntropyLoss(backend="triton")


def test_a_kernel_backend_is_not_fused_into_a_composite(kernels):
    case = make_case("packed", torch.float64)
    composite = CompositeLoss([dict(type="CrossEntropyLoss", backend="liger"), dict(type="ZLoss")])
    value = total(run_loss(composite, case))
    expected = total(run_loss(CrossEntropyLoss(), case)) + total(run_loss(ZLoss(), case))
    torch.testing.assert_close(value, expected)
    assert [call["kernel"] for call in kernels] == ["liger"]
