"""Z-loss and entropy regularisation against naive full-logits references."""

from __future__ import annotations

import pytest

from xtuner.model.losses import EntropyRegularization, ZLoss

from .reference import check_against, make_case


def naive_z(logits, targets):
    return logits.logsumexp(-1) ** 2


def naive_entropy(logits, targets):
    log_p = logits.log_softmax(-1)
    return -(log_p.exp() * log_p).sum(-1)


def test_z_loss(layout, reduction, dtype):
    case = make_case(layout, dtype, bias=True)
    check_against(ZLoss(reduction=reduction, chunk_size=3), naive_z, case, reduction)


@pytest.mark.parametrize("mode,sign", [("maximize", -1.0), ("minimize", 1.0)])
def test_entropy(layout, reduction, dtype, mode, sign):
    case = make_case(layout, dtype)
    loss = EntropyRegularization(mode=mode, reduction=reduction, chunk_size=3)
    check_against(loss, lambda z, y: sign * naive_entropy(z, y), case, reduction)


def test_entropy_mode_is_checked():
    with pytest.raises(ValueError, match="maximize"):
        EntropyRegularization(mode="up")
