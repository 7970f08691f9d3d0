"""Router losses from their sums: equal to the family's own function (padding included), and
a family that balances another way is refused. Sequence, data parallel and accumulation are
tested with torchrun in tests/parallel/test_sequence_parallel.py and
tests/engine/test_train_loop_normalization.py."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from xtuner.model.losses import LossInputError, RouterAuxLoss, RouterZLoss
from xtuner.model.losses.router import RouterOutputs


def router(mask: torch.Tensor | None, balance_fn=load_balancing_loss_func) -> RouterOutputs:
    g = torch.Generator().manual_seed(0)
    logits = tuple(torch.randn(2 * 6, 5, generator=g) * 2 for _ in range(3))  # 3 layers
    return RouterOutputs(logits, mask, num_experts=5, top_k=2, aux_coef=0.1, balance_fn=balance_fn)


MASKS = {"none": None, "padded": torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])}


@pytest.mark.parametrize("mask", list(MASKS))
def test_aux_loss_from_sums_is_the_family_function(mask):
    r = router(MASKS[mask])
    expected = 0.1 * load_balancing_loss_func(r.logits, 5, 2, r.attention_mask)
    torch.testing.assert_close(RouterAuxLoss().router_value(r), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(RouterAuxLoss(coef=0.5).router_value(r), 5 * expected)


def test_z_loss_is_the_mean_over_layers_and_unpadded_tokens():
    r = router(MASKS["padded"])
    keep = MASKS["padded"].reshape(-1).bool()
    z = torch.stack([torch.logsumexp(x[keep], -1) for x in r.logits])
    torch.testing.assert_close(RouterZLoss(coef=0.01).router_value(r), 0.01 * z.square().mean())


def test_bf16_router_logits_pass_the_check():
    r = router(MASKS["padded"])
    r.logits = tuple(x.bfloat16() for x in r.logits)
    expected = 0.1 * load_balancing_loss_func(r.logits, 5, 2, r.attention_mask)
    torch.testing.assert_close(RouterAuxLoss().router_value(r), expected, rtol=2e-2, atol=0)


def test_a_family_that_balances_another_way_is_refused():
    r = router(None, balance_fn=lambda *args: torch.tensor(0.5))
    with pytest.raises(LossInputError, match="load_balancing_loss_func gives 0.5"):
        RouterAuxLoss().router_value(r)
