"""xtuner.parallel.zero without a process group: ZeRO-3 placeholders are recognised, and a
save that would write a partitioned (empty) tensor is refused. The real ZeRO-3 runs are in
tests/tools/test_train_deepspeed.py."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from xtuner.parallel import zero


def _partitioned_like_zero3(param: nn.Parameter) -> nn.Parameter:
    """What ZeRO-3 leaves on a rank: an empty placeholder that knows its real shape."""
    param.ds_id, param.ds_shape = 0, param.shape
    param.data = torch.empty(0)
    return param


def test_plain_parameters_pass_through():
    layer = nn.Linear(3, 2)
    assert not zero.is_partitioned(layer.weight) and zero.full_shape(layer.weight) == (2, 3)
    with zero.gathered(layer.parameters()):  # nothing to gather: a no-op
        pass
    zero.register_external_parameters(layer, [layer.weight, None])
    state = zero.consolidated_state_dict(layer)
    assert state.keys() == layer.state_dict().keys()
    zero.check_whole(state, layer)


def test_a_partial_tensor_is_refused_by_name():
    layer = nn.Linear(3, 2)
    _partitioned_like_zero3(layer.weight)
    assert zero.is_partitioned(layer.weight) and zero.full_shape(layer.weight) == (2, 3)
    with pytest.raises(RuntimeError, match=r"partial tensor.*weight \(0,\) \(should be \(2, 3\)\)"):
        zero.check_whole({"weight": layer.weight.data, "bias": layer.bias.data}, layer)


def test_to_hf_refuses_to_write_what_was_not_gathered(tiny_llama_path, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from xtuner.model import SupervisedFinetune, sft

    model = SupervisedFinetune(llm=AutoModelForCausalLM.from_pretrained(tiny_llama_path))
    _partitioned_like_zero3(model.llm.lm_head.weight)
    # a gather that did not happen: the placeholder itself would be written
    monkeypatch.setattr(sft, "consolidated_state_dict", lambda m: dict(m.state_dict()))
    with pytest.raises(RuntimeError, match=r"lm_head.weight \(0,\)"):
        model.to_hf(None, str(tmp_path / "hf"), fp32=True)
    assert not os.path.exists(tmp_path / "hf" / "model.safetensors")
