"""The in-place row helpers against their out-of-place definitions, in both logits layouts."""

from __future__ import annotations

import pytest
import torch

from xtuner.model.losses import functional
from xtuner.model.losses.functional import (
    is_vocab_major,
    kl_rows,
    linear_into,
    log_softmax_,
    logits_view,
    row_dot,
    scratch,
    scratch_pool,
    softmax_,
    sum_exp,
    target_grad_,
)


def _laid_out(x: torch.Tensor, major: bool) -> torch.Tensor:
    """``x`` [n, V] copied into the given layout (vocabulary-major or row-major)."""
    return x.new_empty(x.shape[::-1]).copy_(x.t()).t() if major else x.clone()


@pytest.mark.parametrize("major", [True, False], ids=["vocab_major", "row_major"])
@pytest.mark.parametrize("shape", [(5, 9), (3, 1000), (1, 7)])
def test_in_place_helpers(major, shape):
    n, vocab = shape
    x = torch.randn(n, vocab, dtype=torch.float64) * 4
    y = torch.randint(0, vocab, (n,))
    lse = softmax_(p := _laid_out(x, major))
    torch.testing.assert_close(p, x.softmax(-1))
    torch.testing.assert_close(lse, x.logsumexp(-1))
    lse = log_softmax_(lp := _laid_out(x, major))
    torch.testing.assert_close(lp, x.log_softmax(-1))
    torch.testing.assert_close(lse, x.logsumexp(-1))
    torch.testing.assert_close(sum_exp(_laid_out(x, major)), x.exp().sum(-1))
    z = torch.randn(n, vocab, dtype=torch.float64)
    torch.testing.assert_close(row_dot(_laid_out(x, major), _laid_out(z, major)), (x * z).sum(-1))
    log_q, log_p = x.log_softmax(-1), z.log_softmax(-1)
    expected_kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    torch.testing.assert_close(
        kl_rows(_laid_out(log_q, major), _laid_out(log_p, major)), expected_kl
    )
    scale = torch.rand(n, dtype=torch.float64)
    expected = scale[:, None] * (x.softmax(-1) - torch.nn.functional.one_hot(y, vocab))
    got = target_grad_(_laid_out(x.softmax(-1), major), y, scale)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("major", [True, False], ids=["vocab_major", "row_major"])
def test_linear_into_and_scratch_keep_the_layout(major):
    hidden, weight, bias = torch.randn(4, 6), torch.randn(11, 6), torch.randn(11)
    flat = torch.empty(4 * 11)
    out = logits_view(flat, 4, 11, major)
    assert is_vocab_major(out) == major
    got = linear_into(hidden, weight, bias, out)
    assert got.data_ptr() == flat.data_ptr()
    torch.testing.assert_close(got, hidden @ weight.t() + bias)
    with scratch_pool():
        first = scratch("key", out)
        assert first.shape == out.shape and is_vocab_major(first) == major
        smaller = scratch("key", out[:3] if not major else logits_view(flat, 3, 11, major))
        assert smaller.data_ptr() == first.data_ptr() and smaller.shape == (3, 11)
        assert is_vocab_major(smaller) == major


def test_on_cpu_chunks_are_vocabulary_major():
    assert functional.vocab_major(torch.device("cpu"))


def test_empty_rows():
    x = torch.zeros(0, 7)
    assert softmax_(x).shape == (0,) and row_dot(x, x).shape == (0,)
    assert log_softmax_(x).shape == (0,)
