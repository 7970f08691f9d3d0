"""Sequence parallel: the upstream API, Ulysses attention, and sp=2 == sp=1 (loss and grads).

Single-process tests check each piece without communication. The ``multiproc`` tests launch
``sp_worker.py`` with torchrun on 2 CPU processes (gloo, fp32) once per module.
"""

from __future__ import annotations

import importlib.util
import os.path as osp

import pytest
import torch

import xtuner.parallel.sequence.data_collate as data_collate
from xtuner.parallel import sequence as sp_api
from xtuner.parallel.sequence import (
    CONTEXT_KWARG,
    SequenceParallelContext,
    SequenceParallelSampler,
    check_heads_for_sequence_parallel,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_sequence_parallel_rank,
    get_sequence_parallel_world_size,
    init_sequence_parallel,
    kv_repeats_for_sequence_parallel,
    pad_for_sequence_parallel,
    reduce_sequence_parallel_loss,
    split_for_sequence_parallel,
)

HERE = osp.dirname(osp.abspath(__file__))
_spec = importlib.util.spec_from_file_location("sp_worker", osp.join(HERE, "sp_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

UPSTREAM_NAMES = [
    "init_sequence_parallel",
    "get_sequence_parallel_group",
    "get_sequence_parallel_world_size",
    "get_sequence_parallel_rank",
    "get_data_parallel_group",
    "get_data_parallel_world_size",
    "get_data_parallel_rank",
    "split_for_sequence_parallel",
    "gather_for_sequence_parallel",
    "split_forward_gather_backward",
    "gather_forward_split_backward",
    "all_to_all",
    "pad_for_sequence_parallel",
    "reduce_sequence_parallel_loss",
    "SequenceParallelSampler",
    "pre_process_for_sequence_parallel_attn",
    "post_process_for_sequence_parallel_attn",
]


def assert_grads_equal(ref: dict, got: dict, rtol: float = 1e-5) -> None:
    assert ref.keys() == got.keys()
    for name in ref:
        scale = float(ref[name].abs().max())
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(
            got[name], ref[name], rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.fixture
def fake_sp(monkeypatch):
    """Pretends this single process is rank ``rank`` of a sequence-parallel group of ``size``."""

    def apply(size: int, rank: int = 0) -> None:
        monkeypatch.setattr(data_collate, "get_sequence_parallel_world_size", lambda: size)
        monkeypatch.setattr(data_collate, "get_sequence_parallel_rank", lambda: rank)

    return apply


# the API without communication ------------------------------------------------------------
@pytest.mark.parametrize("name", UPSTREAM_NAMES)
def test_upstream_names_are_exported(name):
    assert callable(getattr(sp_api, name))


def test_single_process_defaults():
    init_sequence_parallel(1)
    assert get_sequence_parallel_world_size() == 1
    assert get_sequence_parallel_rank() == 0
    assert get_data_parallel_world_size() == 1
    assert get_data_parallel_rank() == 0
    with pytest.raises(RuntimeError, match="NPROC_PER_NODE"):
        init_sequence_parallel(2)
    x = torch.randn(2, 4, 3)
    assert split_for_sequence_parallel(x, 1, None) is x
    assert sp_api.all_to_all(x) is x
    assert sp_api.gather_for_sequence_parallel(x, 1) is x
    assert sp_api.split_forward_gather_backward(x, 1) is x
    mean = torch.tensor(2.0, requires_grad=True)
    assert reduce_sequence_parallel_loss(mean, 3) is mean


def test_pad_for_sequence_parallel(fake_sp):
    x = torch.arange(10).view(2, 5)
    assert pad_for_sequence_parallel(x, -1, dim=1) is x
    fake_sp(4)
    padded = pad_for_sequence_parallel(x, -1, dim=1)
    assert padded.shape == (2, 8)
    assert padded[:, 5:].eq(-1).all() and padded[:, :5].equal(x)
    assert pad_for_sequence_parallel(torch.zeros(3, 8), 0, dim=-1).shape == (3, 8)


def test_batch_split_pads_shards_and_keeps_the_whole_sequence_for_attention(fake_sp):
    fake_sp(2, rank=1)
    ids = torch.arange(1, 8)[None]  # 7 tokens: padded to 8
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    labels = ids + 100
    inputs = {"input_ids": ids, "position_ids": positions, "attention_mask": None}
    weights = {"token": torch.ones(1, 7)}
    extras = {"teacher": torch.randn(1, 7, 3)}
    local, local_labels, local_w, local_x = split_for_sequence_parallel(
        inputs, labels, weights, extras
    )
    assert local["input_ids"].tolist() == [[5, 6, 7, 0]]
    assert local["position_ids"].tolist() == [[1, 2, 3, 4]]
    assert local["attention_mask"] is None
    assert local_labels.tolist() == [[105, 106, 107, -100]]
    assert local_w["token"].tolist() == [[1.0, 1.0, 1.0, 0.0]]
    assert local_x["teacher"].shape == (1, 4, 3) and local_x["teacher"][0, 3].eq(0).all()
    context = local[CONTEXT_KWARG]
    # The pad continues the last document, so it never opens a new one.
    assert context.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert context.attention_mask is None


def test_batch_split_keeps_the_full_padding_mask(fake_sp):
    fake_sp(2, rank=0)
    mask = torch.tensor([[1, 1, 1, 0]])
    inputs = {"input_ids": torch.ones(1, 4, dtype=torch.long), "attention_mask": mask}
    local, *_ = split_for_sequence_parallel(inputs, torch.zeros(1, 4, dtype=torch.long), {}, {})
    assert local[CONTEXT_KWARG].attention_mask.equal(mask)
    assert local[CONTEXT_KWARG].position_ids.tolist() == [[0, 1, 2, 3]]


def test_shard_padding_mask_counts_the_sequence_parallel_pads_out(fake_sp):
    from xtuner.parallel.sequence import shard_padding_mask

    assert shard_padding_mask(None, 1, 4, "cpu") is None  # one rank: every token counts
    fake_sp(2, rank=1)
    assert shard_padding_mask(None, 1, 8, "cpu") is None
    assert shard_padding_mask(None, 1, 7, "cpu").tolist() == [[1, 1, 1, 0]]
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    assert shard_padding_mask(mask, 1, 7, "cpu").tolist() == [[1, 0, 0, 0]]


def test_heads_checks():
    assert kv_repeats_for_sequence_parallel(2, 2) == 1
    assert kv_repeats_for_sequence_parallel(1, 2) == 2
    assert kv_repeats_for_sequence_parallel(2, 4) == 2
    assert kv_repeats_for_sequence_parallel(6, 4) == 2
    check_heads_for_sequence_parallel(8, 4)
    with pytest.raises(ValueError, match="num_attention_heads=6.*sequence_parallel_size=4"):
        check_heads_for_sequence_parallel(6, 4)


def test_sampler_is_the_default_sampler_in_one_process():
    from mmengine.dataset import DefaultSampler
    from mmengine.registry import DATA_SAMPLERS

    assert DATA_SAMPLERS.get("SequenceParallelSampler") is SequenceParallelSampler
    ours = SequenceParallelSampler(list(range(7)), shuffle=True, seed=1)
    theirs = DefaultSampler(list(range(7)), shuffle=True, seed=1)
    assert list(ours) == list(theirs) and len(ours) == 7


# Ulysses attention without communication ---------------------------------------------------
def _packed_inputs():
    batch = worker.packed_batch()
    return batch["input_ids"], batch["position_ids"]


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_registered_attention_without_context_is_the_kernel(kernel):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    import xtuner.model.modules  # noqa: F401  (registers the functions)

    name = f"xtuner_ulysses_{kernel}"
    assert name in ALL_ATTENTION_FUNCTIONS and name in ALL_MASK_ATTENTION_FUNCTIONS
    batch = worker.padded_batch()
    plain = worker.build_hf("llama", kernel)
    ours = worker.build_hf("llama", kernel)
    ours.config._attn_implementation = name
    with torch.no_grad():
        a = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kind, kernel",
    [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("qwen2_sliding", "sdpa")],
)
def test_context_builds_the_whole_sequence_mask(kind, kernel):
    """With one rank the all-to-alls are identities, so this isolates the mask built from the
    context: packed documents must stay apart exactly as transformers keeps them."""
    import xtuner.model.modules  # noqa: F401

    ids, positions = _packed_inputs()
    plain = worker.build_hf(kind, kernel)
    ours = worker.build_hf(kind, kernel)
    ours.config._attn_implementation = f"xtuner_ulysses_{kernel}"
    context = SequenceParallelContext(position_ids=positions)
    kwargs = {"input_ids": ids, "use_cache": False}  # a cache would disable packing
    with torch.no_grad():
        a = plain(position_ids=positions, **kwargs).logits
        b = ours(position_ids=positions, **kwargs, **{CONTEXT_KWARG: context}).logits
        unpacked = plain(**kwargs).logits
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, unpacked, atol=1e-4)  # the documents really are kept apart
    # built once per kind of layer (full / sliding window), shared by the layers
    assert len(context.masks) == (2 if kind == "qwen2_sliding" else 1)


def test_enable_sequence_parallel_attention(monkeypatch):
    import xtuner.model.modules.sequence_parallel_attention as spa
    from xtuner.model.modules import enable_sequence_parallel_attention

    model = worker.build_hf("llama", "sdpa")
    enable_sequence_parallel_attention(model)  # no sequence parallel: nothing changes
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(spa, "get_sequence_parallel_world_size", lambda: 2)
    enable_sequence_parallel_attention(model)
    enable_sequence_parallel_attention(model)
    assert model.config._attn_implementation == "xtuner_ulysses_sdpa"
    monkeypatch.setattr(spa, "get_sequence_parallel_world_size", lambda: 3)
    with pytest.raises(ValueError, match="num_attention_heads=4"):
        enable_sequence_parallel_attention(worker.build_hf("llama", "sdpa"))
    monkeypatch.setattr(spa, "get_sequence_parallel_world_size", lambda: 2)
    flex = worker.build_hf("llama", "sdpa")
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(NotImplementedError, match="flex_attention"):
        enable_sequence_parallel_attention(flex)
    monkeypatch.setattr(type(model), "_supports_attention_backend", False)
    with pytest.raises(NotImplementedError, match="AttentionInterface"):
        enable_sequence_parallel_attention(worker.build_hf("llama", "sdpa"))


# sp=2 vs sp=1, two processes -----------------------------------------------------------------
@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    return worker.session_results(str(tmp_path_factory.getbasetemp()))


@pytest.mark.multiproc
def test_collectives_and_loss_reduction(sp_results):
    for name, (got, expected) in sp_results["collectives"].items():
        torch.testing.assert_close(got, expected, msg=lambda m, n=name: f"{n}: {m}")


def _scenario_names() -> list[str]:
    return [case[0] for case in worker.sp_scenarios()]


@pytest.mark.multiproc
@pytest.mark.parametrize("name", _scenario_names())
def test_sp2_equals_sp1(sp_results, name):
    result = sp_results[name]
    assert result["attn"].startswith("xtuner_ulysses_")
    torch.testing.assert_close(result["sp_loss"], result["ref_loss"], rtol=1e-5, atol=0)
    assert_grads_equal(result["ref_grads"], result["sp_grads"])


@pytest.mark.multiproc
@pytest.mark.parametrize("name", worker.HF_REFERENCE)
def test_sp2_equals_the_hf_model_loss(sp_results, name):
    """MoE with router logits on: sp=2 gives the HF model's own loss on the whole sequence
    (cross-entropy + router_aux_loss_coef * aux_loss), value and every gradient."""
    result = sp_results[name]
    torch.testing.assert_close(result["sp_loss"], result["hf_loss"], rtol=1e-5, atol=0)
    assert_grads_equal(result["hf_grads"], result["sp_grads"])


@pytest.mark.multiproc
def test_required_losses_were_covered(sp_results):
    losses = {name.split("-")[1] for name in sp_results if name.count("-") == 2}
    assert {"ce", "ce_sample_smooth", "focal", "ce_plus_z", "router_z"} <= losses
    moe = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2"}
    assert moe <= {name.split("-")[0] for name in sp_results}


@pytest.mark.multiproc
def test_upstream_identity_backward_gives_other_gradients(sp_results):
    """Upstream's reduction (token-weighted value, identity backward) on the same batch: the
    comparison above is able to fail."""
    ref, got = sp_results["upstream"]["ref_grads"], sp_results["upstream"]["sp_grads"]
    with pytest.raises(AssertionError):
        assert_grads_equal(ref, got, rtol=1e-3)
