"""build_loss and CompositeLoss: config forms, clear errors, sums, fusion and naming."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xtuner.model.losses import (
    BaseLoss,
    CompositeLoss,
    CrossEntropyLoss,
    FocalLoss,
    LossConfigError,
    TokenLoss,
    ZLoss,
    build_loss,
)
from xtuner.model.losses.builder import _FusedTokenLoss

from .reference import assert_close_all, grads, make_case, run_loss, total


def test_config_forms():
    assert type(build_loss(None)) is CrossEntropyLoss
    assert type(build_loss(dict(type="FocalLoss", gamma=1.0))) is FocalLoss
    assert type(build_loss(dict(type=FocalLoss))) is FocalLoss
    assert type(build_loss(dict(type="xtuner.model.losses.focal.FocalLoss"))) is FocalLoss
    module = ZLoss()
    assert build_loss(module) is module
    composite = build_loss([dict(type="CrossEntropyLoss"), dict(type="ZLoss", loss_weight=1e-4)])
    assert isinstance(composite, CompositeLoss) and composite.factors == [1.0, 1e-4]
    single = build_loss(dict(type="FocalLoss", loss_weight=0.5))
    assert isinstance(single, CompositeLoss) and single.factors == [0.5]


def test_unknown_name_lists_registered_and_suggests_nearest():
    with pytest.raises(
        LossConfigError, match="Did you mean 'FocalLoss'.*Registered losses:.*KDLoss"
    ):
        build_loss(dict(type="FocalLos"))


def test_wrong_argument_names_the_loss_and_the_argument():
    with pytest.raises(LossConfigError, match="FocalLoss: unknown argument.*'gama'.*'gamma'"):
        build_loss(dict(type="FocalLoss", gama=2.0))


def test_bad_dotted_path_and_class_type():
    with pytest.raises(LossConfigError, match="cannot import module 'no_such_pkg.losses'"):
        build_loss(dict(type="no_such_pkg.losses.MyLoss"))
    with pytest.raises(LossConfigError, match="has no 'NoSuchLoss'"):
        build_loss(dict(type="xtuner.model.losses.NoSuchLoss"))
    with pytest.raises(LossConfigError, match="not a subclass of xtuner.model.losses.BaseLoss"):
        build_loss(dict(type=nn.MSELoss))
    with pytest.raises(LossConfigError, match="does not derive from"):
        build_loss(nn.MSELoss())
    with pytest.raises(LossConfigError, match="no 'type' key"):
        build_loss(dict(gamma=2.0))


def _separate_sum(cfgs, factors, case):
    value = 0
    for cfg, factor in zip(cfgs, factors):
        value = value + factor * total(run_loss(build_loss(cfg), case))
    return value


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_composite_equals_the_sum_of_separate_losses(layout):
    cfgs = [
        dict(type="CrossEntropyLoss", chunk_size=3),
        dict(type="ZLoss", chunk_size=3),
        dict(type="EntropyRegularization", chunk_size=3),
        dict(type="FocalLoss", chunk_size=3, reduction="sample"),  # other weights: own pass
    ]
    factors = [1.0, 1e-2, 0.5, 2.0]
    composite = build_loss([dict(c, loss_weight=f) for c, f in zip(cfgs, factors)])
    kinds = [type(loss) for loss, _ in composite._plan]
    assert kinds == [_FusedTokenLoss, FocalLoss]
    case = make_case(layout, bias=True)
    result = run_loss(composite, case)
    assert {"loss_ce", "loss_z", "loss_entropy", "loss_focal"} <= set(result)
    value = total(result)
    expected = _separate_sum(cfgs, factors, case)
    assert_close_all([value, *grads(value, case)], [expected, *grads(expected, case)])
    # each term is its own loss times its factor
    alone = total(run_loss(ZLoss(chunk_size=3), case))
    torch.testing.assert_close(result["loss_z"], 1e-2 * alone.detach())


def test_duplicate_names_are_renamed_and_clashes_rejected():
    composite = build_loss(
        [dict(type="CrossEntropyLoss"), dict(type="CrossEntropyLoss", label_smoothing=0.1)]
    )
    assert composite.term_names() == ["ce", "ce_1"]
    result = run_loss(composite, make_case("padded"))
    assert {"loss_ce", "loss_ce_1"} <= set(result)

    class TwoTerms(TokenLoss):
        def term_names(self):
            return ["ce", "other"]

    with pytest.raises(LossConfigError, match="TwoTerms logs \\['ce'\\]"):
        CompositeLoss([CrossEntropyLoss(), TwoTerms()])


def test_composite_nonfinite_option_reaches_every_loss():
    composite = CompositeLoss([dict(type="CrossEntropyLoss"), dict(type="ZLoss")], nonfinite="skip")
    assert {m.nonfinite for m in composite.modules() if isinstance(m, BaseLoss)} == {"skip"}
    with pytest.raises(ValueError, match="nonfinite"):
        CrossEntropyLoss(nonfinite="ignore")


def test_composite_weights_argument_and_errors():
    composite = CompositeLoss(
        [dict(type="CrossEntropyLoss"), dict(type="ZLoss")], weights=[2.0, 0.5]
    )
    assert composite.factors == [2.0, 0.5]
    with pytest.raises(LossConfigError, match="2 weights for 1 losses"):
        CompositeLoss([dict(type="ZLoss")], weights=[1.0, 2.0])
    with pytest.raises(LossConfigError, match="at least one"):
        CompositeLoss([])
