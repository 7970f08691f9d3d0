"""DPO-family losses under sequence parallel and data parallel with gradient accumulation.

One torchrun launch of ``dpo_worker.py`` (2 CPU processes, gloo) serves every test here.
"""

from __future__ import annotations

import importlib.util
import os.path as osp

import pytest
import torch

HERE = osp.dirname(osp.abspath(__file__))
_spec = importlib.util.spec_from_file_location("dpo_worker", osp.join(HERE, "dpo_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return worker.launch(str(tmp_path_factory.mktemp("dpo_parallel") / "results.pt"))


def assert_grads_equal(ref: dict, got: dict, rtol: float = 1e-5) -> None:
    assert ref.keys() == got.keys() and ref
    for name in ref:
        scale = float(ref[name].abs().max())
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=rtol * scale, msg=name)


@pytest.mark.multiproc
@pytest.mark.parametrize("name", sorted(worker.SP_CASES))
def test_sequence_parallel_equals_one_process(results, name):
    case = results[name]
    assert case["attn"].startswith("xtuner_ulysses_")
    assert case["sp_loss"].item() == pytest.approx(case["ref_loss"].item(), rel=1e-5)
    assert_grads_equal(case["ref_grads"], case["sp_grads"])
    for key, value in case["ref_metrics"].items():
        assert case["sp_metrics"][key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-6)


@pytest.mark.multiproc
def test_two_ranks_with_accumulation_equal_one_process_with_the_whole_window(results):
    steps, reference = results["acc"]["steps"], results["acc"]["reference"]
    assert len(steps) == len(reference) == 2
    for got, ref in zip(steps, reference):
        assert_grads_equal(ref, got)
