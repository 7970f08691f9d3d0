"""The worked example in examples/custom_loss: a user loss from the user's own module."""

from __future__ import annotations

import os.path as osp

import pytest
import torch
from mmengine.utils import import_modules_from_strings

from xtuner.model.losses import build_loss

from .reference import check_against, make_case

EXAMPLE_DIR = osp.join(osp.dirname(__file__), "..", "..", "..", "examples", "custom_loss")


@pytest.fixture
def example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(osp.abspath(EXAMPLE_DIR))


def naive_poly1(epsilon):
    def fn(logits, targets):
        log_p = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
        return -log_p + epsilon * (1 - log_p.exp())

    return fn


def test_custom_imports_then_registered_name(example_on_path):
    import_modules_from_strings(["my_losses"])  # what mmengine does with custom_imports
    loss = build_loss(dict(type="Poly1Loss", epsilon=2.0, chunk_size=3))
    assert type(loss).__module__ == "my_losses"
    for reduction in ("token", "sample"):
        loss = build_loss(dict(type="Poly1Loss", epsilon=2.0, chunk_size=3, reduction=reduction))
        check_against(loss, naive_poly1(2.0), make_case("packed"), reduction)


def test_dotted_path_and_composite(example_on_path):
    loss = build_loss(
        [dict(type="my_losses.Poly1Loss", epsilon=0.5), dict(type="ZLoss", loss_weight=1e-3)]
    )
    case = make_case("padded", torch.float32)

    def naive(logits, targets):
        return naive_poly1(0.5)(logits, targets) + 1e-3 * logits.logsumexp(-1) ** 2

    check_against(loss, naive, case, "token")
