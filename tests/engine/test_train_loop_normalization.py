"""TrainLoop's global loss normalisation: the gradient of each optimizer step equals the
gradient of the token mean over the whole global batch, as one process would compute it.

The ``multiproc`` tests run the real mmengine Runner + TrainLoop + DDP on 2 CPU processes
(``tests/parallel/sp_worker.py``, one launch shared with the sequence-parallel tests): SGD
with lr 0, so every step's gradient is taken at the same parameters, captured right before
``optimizer.step()``.
"""

from __future__ import annotations

import importlib.util
import os.path as osp
from types import SimpleNamespace

import pytest
import torch

from xtuner.engine.runner import TrainLoop

WORKER = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), "parallel", "sp_worker.py")
_spec = importlib.util.spec_from_file_location("sp_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def assert_grads_equal(ref: dict, got: dict, rtol: float = 1e-5) -> None:
    assert ref.keys() == got.keys()
    for name in ref:
        scale = float(ref[name].abs().max())
        torch.testing.assert_close(
            got[name], ref[name], rtol=rtol, atol=rtol * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def _loop_with_wrapper(iteration: int, **counts) -> TrainLoop:
    loop = TrainLoop.__new__(TrainLoop)
    loop._iter = iteration
    loop._runner = SimpleNamespace(optim_wrapper=SimpleNamespace(**counts))
    return loop


def test_accumulation_divisor_follows_the_optim_wrapper():
    # 10 iterations, accumulation 4: windows of 4, 4, then a short window of 2 divided by 2.
    counts = dict(_accumulative_counts=4, _max_counts=10, _remainder_counts=2)
    assert _loop_with_wrapper(0, _inner_count=0, **counts)._accumulation() == (4, 4)
    assert _loop_with_wrapper(4, _inner_count=4, **counts)._accumulation() == (4, 4)
    assert _loop_with_wrapper(8, _inner_count=8, **counts)._accumulation() == (4, 2)
    even = dict(_accumulative_counts=4, _max_counts=8, _remainder_counts=0)
    assert _loop_with_wrapper(4, _inner_count=4, **even)._accumulation() == (4, 4)
    assert _loop_with_wrapper(0, _accumulative_counts=1)._accumulation() == (1, 1)


@pytest.fixture(scope="module")
def accumulation_results(tmp_path_factory):
    return worker.session_results(str(tmp_path_factory.getbasetemp()))


@pytest.mark.multiproc
def test_two_ranks_times_accumulation_equal_one_process(accumulation_results):
    """dp=2 x accumulation 2, micro-batches with 20, 1, 3 and 22 targets; then a short last
    window (1 micro-batch per rank, divided by 1 by the optim wrapper)."""
    steps = accumulation_results["dp2_global"]
    reference = accumulation_results["dp2_reference"]
    assert len(steps) == 2
    for got, ref in zip(steps, reference):
        assert_grads_equal(ref, got)


@pytest.mark.multiproc
def test_moe_router_loss_is_the_mean_over_forwards(accumulation_results):
    """Mixtral (router logits on), dp=2 x accumulation 2 then a short window: the token loss
    over the whole window plus the mean of the HF model's router loss per forward."""
    steps = accumulation_results["dp2_moe_global"]
    assert len(steps) == 2
    for got, ref in zip(steps, accumulation_results["dp2_moe_reference"]):
        assert_grads_equal(ref, got)


@pytest.mark.multiproc
def test_micro_batch_normalisation_is_upstreams_unequal_weighting(accumulation_results):
    """``loss_normalization='micro_batch'`` (upstream's per-micro-batch mean) gives other
    gradients on the same data: the comparison above is able to fail."""
    steps = accumulation_results["dp2_micro_batch"]
    for got, ref in zip(steps, accumulation_results["dp2_reference"]):
        with pytest.raises(AssertionError):
            assert_grads_equal(ref, got, rtol=1e-3)


@pytest.mark.multiproc
def test_sequence_parallel_times_accumulation_equal_one_process(accumulation_results):
    """sp=2 x dp=1 x accumulation 2 with SequenceParallelSampler."""
    steps = accumulation_results["sp2_global"]
    assert len(steps) == 1
    assert_grads_equal(accumulation_results["sp2_reference"][0], steps[0])
    moe = accumulation_results["sp2_moe_global"]  # Qwen3-MoE, router logits on
    assert len(moe) == 1
    assert_grads_equal(accumulation_results["sp2_moe_reference"][0], moe[0])


def test_max_nonfinite_skips_stops_the_run():
    """Skipped iterations (reported by finalize_loss) are counted; one more than allowed
    raises, naming the iteration and the limit; the flag never reaches the log."""
    from xtuner.model.losses.normalize import SKIPPED_KEY

    loop = TrainLoop.__new__(TrainLoop)
    loop.max_nonfinite_skips, loop.nonfinite_skips, loop._iter = 1, 0, 4
    outputs = {"loss": torch.tensor(1.0), SKIPPED_KEY: torch.ones(())}
    loop._count_nonfinite_skip(outputs)
    assert SKIPPED_KEY not in outputs and loop.nonfinite_skips == 1
    loop._count_nonfinite_skip({"loss": torch.tensor(1.0)})  # a normal step
    with pytest.raises(FloatingPointError, match=r"2 iterations .*iteration 5.*skips=1"):
        loop._count_nonfinite_skip({SKIPPED_KEY: torch.ones(())})


def test_building_the_loop_leaves_the_global_generator_alone():
    """mmengine's Runner builds the model before the loop, FlexibleRunner (DeepSpeed) after
    it: for the same seed to give the same LoRA initialisation in both, building the loop
    (which starts dataloader iterators, each drawing a base seed) must draw nothing."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    before = torch.get_rng_state()
    TrainLoop(
        SimpleNamespace(), DataLoader(list(range(8)), batch_size=2, shuffle=True), max_iters=3
    )
    assert torch.equal(torch.get_rng_state(), before)
