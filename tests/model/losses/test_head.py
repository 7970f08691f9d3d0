"""The output head's post-processing in the chunked path, against naive full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xtuner.model.losses import CrossEntropyLoss, FocalLoss, LogitTransform, ZLoss
from xtuner.model.losses.builder import CompositeLoss
from xtuner.model.losses.head import check_head_equivalence, head_mode

from .reference import check_against, make_case
from .test_focal import naive_focal

TRANSFORMS = [
    LogitTransform(scale=0.25),
    LogitTransform(softcap=1.5),
    LogitTransform(scale=3.0, softcap=2.0),
]


def naive_ce(logits, targets):
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")


@pytest.mark.parametrize("transform", TRANSFORMS, ids=["scale", "softcap", "both"])
def test_post_processed_logits_chunk_by_chunk(layout, dtype, transform):
    # Several chunks per pass (chunk_size 3): the soft cap's saved tanh is per chunk.
    case = make_case(layout, dtype, bias=True)
    check_against(CrossEntropyLoss(chunk_size=3), naive_ce, case, "token", transform=transform)
    check_against(
        FocalLoss(gamma=2.0, chunk_size=2), naive_focal(2.0), case, "token", transform=transform
    )


def test_post_processed_logits_in_a_fused_composite(dtype):
    # Two losses fused over one pass of logits: each sees the transformed logits.
    case = make_case("packed", dtype)
    transform = LogitTransform(softcap=1.0)
    loss = CompositeLoss(
        [dict(type="CrossEntropyLoss", chunk_size=4), dict(type="ZLoss", chunk_size=4)]
    )

    def naive(logits, targets):
        return naive_ce(logits, targets) + torch.logsumexp(logits, -1).square()

    check_against(loss, naive, case, "token", transform=transform)
    assert isinstance(loss.losses[1], ZLoss)


def test_probe_tolerance_follows_the_dtype():
    theirs = torch.randn(1, 4, 10) * 5
    check_head_equivalence("M", "default", theirs, theirs + 1e-5, torch.float32)
    with pytest.raises(ValueError, match="M: .*largest logit difference"):
        check_head_equivalence("M", "default", theirs, theirs * 1.01, torch.float32)
    check_head_equivalence("M", "default", theirs, theirs * 1.01, torch.bfloat16)
    with pytest.raises(ValueError, match="shape"):
        check_head_equivalence("M", "default", theirs, theirs[..., :5], torch.float32)


def test_head_option_is_checked():
    assert head_mode(None) == "chunked" and head_mode("model") == "model"
    with pytest.raises(ValueError, match="head='logits'.*'chunked'.*'model'"):
        head_mode("logits")
