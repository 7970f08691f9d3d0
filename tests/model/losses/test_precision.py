"""Precision of the chunked path with 16-bit heads and under autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from xtuner.model.losses import CrossEntropyLoss, LossContext, compute_weights, finalize_loss
from xtuner.model.losses.functional import linear_into, logits_view

GEMMS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.mm.out,
    torch.ops.aten.addmm.default,
    torch.ops.aten.addmm.out,
    torch.ops.aten.addmm_.default,
}


def chunked_grads(hidden, weight, targets, **loss_kwargs):
    """Loss and (grad hidden, grad weight) of the chunked cross-entropy, token mean."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    labels = targets[None]
    loss = CrossEntropyLoss(**loss_kwargs)
    weights = compute_weights(loss.weight_specs(), labels)
    ctx = LossContext(hidden[None], weight, None, labels, weights)
    out = finalize_loss(loss(ctx), weights)["loss"]
    out.backward()
    return out.detach(), hidden.grad, weight.grad


def hf_grads(hidden, weight, targets):
    """The HF path: 16-bit logits, upcast, mean cross-entropy."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = F.cross_entropy(F.linear(hidden, weight).float(), targets)
    out.backward()
    return out.detach(), hidden.grad, weight.grad


def rel_error(got, want):
    return float((got.double() - want).norm() / want.norm())


def test_bf16_head_gradient_error_does_not_grow_with_the_chunk_count():
    g = torch.Generator().manual_seed(0)
    n, dim, vocab = 8192, 64, 256
    hidden = torch.randn(n, dim, generator=g).bfloat16()
    weight = (torch.randn(vocab, dim, generator=g) * dim**-0.5).bfloat16()
    targets = torch.randint(0, vocab, (n,), generator=g)
    _, _, exact = hf_grads(hidden.double(), weight.double(), targets)
    _, _, hf = hf_grads(hidden, weight, targets)
    _, _, ours = chunked_grads(hidden, weight, targets, chunk_size=n // 64)  # 64 chunks
    _, _, in_bf16 = chunked_grads(
        hidden, weight, targets, chunk_size=n // 64, head_grad_dtype="head"
    )
    hf_err, ours_err, bf16_err = (rel_error(x, exact) for x in (hf, ours, in_bf16))
    assert ours.dtype == torch.bfloat16
    assert ours_err <= 1.2 * hf_err, (ours_err, hf_err)
    # Accumulating in bf16 (head_grad_dtype='head') is what float32 accumulation avoids.
    assert bf16_err > 1.5 * hf_err, (bf16_err, hf_err)


def test_fp16_head_gradient_stays_finite_with_an_outlier_unit():
    g = torch.Generator().manual_seed(1)
    n, dim, vocab = 32768, 16, 64
    hidden = torch.randn(n, dim, generator=g)
    hidden[:, 0] = 200.0  # one outlier hidden unit
    hidden = hidden.half()
    weight = (torch.randn(vocab, dim, generator=g) * 0.01).half()
    targets = torch.randint(0, vocab, (n,), generator=g)
    _, _, hf = hf_grads(hidden, weight, targets)
    _, _, exact = hf_grads(hidden.double(), weight.double(), targets)
    _, grad_h, ours = chunked_grads(hidden, weight, targets, chunk_size=4096)
    assert bool(hf.isfinite().all())
    assert bool(ours.isfinite().all()) and bool(grad_h.isfinite().all())
    assert rel_error(ours, exact) <= 1.2 * rel_error(hf, exact) + 1e-3
    # The unnormalised sum accumulated in fp16 overflows: what float32 accumulation fixes.
    _, _, in_fp16 = chunked_grads(hidden, weight, targets, chunk_size=4096, head_grad_dtype="head")
    assert not bool(in_fp16.isfinite().all())


def test_gemms_run_in_the_autocast_dtype():
    seen: list[tuple] = []

    class RecordGemms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in GEMMS:
                seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(40, 16, generator=g)
    weight = torch.randn(50, 16, generator=g) * 0.25  # float32 master weights
    targets = torch.randint(0, 50, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16), RecordGemms():
        value, grad_h, grad_w = chunked_grads(hidden, weight, targets, chunk_size=8)
    # Per chunk: the logits, the hidden-state gradient and the weight gradient.
    assert len(seen) == 3 * 5
    assert all(dtype == torch.bfloat16 for dtypes in seen for dtype in dtypes), seen
    assert grad_h.dtype == grad_w.dtype == torch.float32
    ref_value, ref_h, ref_w = hf_grads(
        hidden.bfloat16().float(), weight.bfloat16().float(), targets
    )
    torch.testing.assert_close(value, ref_value, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad_w, ref_w, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("major", [True, False])
def test_bias_is_added_before_rounding(major):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 32, generator=g).bfloat16()
    weight = torch.randn(40, 32, generator=g).bfloat16()
    bias = (torch.randn(40, generator=g) * 100).bfloat16()
    out = logits_view(torch.empty(6 * 40, dtype=torch.bfloat16), 6, 40, major)
    got = linear_into(hidden, weight, bias, out)
    exact = (hidden.double() @ weight.double().t() + bias.double()).bfloat16()
    assert torch.equal(got, exact) or torch.equal(got, F.linear(hidden, weight, bias))
