"""The in-place row helpers against their out-of-place definitions."""

from __future__ import annotations

import torch

from xtuner.model.losses.functional import log_softmax_, row_dot, softmax_, target_grad_


def test_in_place_helpers():
    x = torch.randn(5, 9, dtype=torch.float64) * 4
    y = torch.tensor([0, 3, 8, 2, 2])
    lse = softmax_(p := x.clone())
    torch.testing.assert_close(p, x.softmax(-1))
    torch.testing.assert_close(lse, x.logsumexp(-1))
    lse = log_softmax_(lp := x.clone())
    torch.testing.assert_close(lp, x.log_softmax(-1))
    torch.testing.assert_close(lse, x.logsumexp(-1))
    z = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(row_dot(x, z), (x * z).sum(-1))
    scale = torch.rand(5, dtype=torch.float64)
    expected = scale[:, None] * (x.softmax(-1) - torch.nn.functional.one_hot(y, 9))
    torch.testing.assert_close(target_grad_(x.softmax(-1), y, scale), expected)


def test_empty_rows():
    x = torch.zeros(0, 7)
    assert softmax_(x).shape == (0,) and row_dot(x, x).shape == (0,)
