"""DFT (probability-weighted cross-entropy) against a naive full-logits reference."""

from __future__ import annotations

from xtuner.model.losses import DFTLoss

from .reference import check_against, make_case


def naive_dft(logits, targets):
    log_p = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    return -log_p.exp().detach() * log_p


def test_dft(layout, reduction, dtype):
    case = make_case(layout, dtype, bias=True)
    check_against(DFTLoss(reduction=reduction, chunk_size=3), naive_dft, case, reduction)
