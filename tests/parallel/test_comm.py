"""Cross-rank agreement (NaN policy, logged values) and the collective timeout, on 2 real
processes (torchrun, gloo); see tests/parallel/comm_worker.py."""

from __future__ import annotations

import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from xtuner.parallel.comm import nonfinite_ranks, token_weighted_mean

HERE = osp.dirname(osp.abspath(__file__))


def test_single_process():
    import torch

    assert nonfinite_ranks(torch.tensor([1.0, float("inf")])) == [[], [0]]
    values = {"loss": torch.tensor(2.0), "num_tokens": torch.tensor(5.0)}
    assert token_weighted_mean(values) is values


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("comm")
    sys.path.insert(0, HERE)
    from sp_worker import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", osp.join(HERE, "comm_worker.py"), str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.multiproc
def test_nonfinite_is_decided_on_every_rank_alike(results):
    for r in results:
        assert r["nonfinite_ranks"] == [[], [1], []]
        # raise: both ranks stop, naming the term, the iteration and the rank
        assert "'loss' (not finite on rank(s) [1]) at iteration 1" in r["raise"]
    # skip: both ranks drop step 1 (the weights do not move), and stay equal
    skip0, skip1 = results[0]["skip"], results[1]["skip"]
    assert skip0 == skip1
    assert skip0[1] == skip0[0] and skip0[2] != skip0[1]
    assert skip0[3] == [False, True, False]  # the step TrainLoop counts (max_nonfinite_skips)


@pytest.mark.multiproc
def test_logged_values_are_the_global_batch_token_mean(results):
    # rank 0: loss 2 over 10 tokens, rank 1: loss 3 over 20 tokens
    for r in results:
        assert r["logged"]["loss"] == pytest.approx((2 * 10 + 3 * 20) / 30)
        assert r["logged"]["num_tokens"] == 30


@pytest.mark.multiproc
def test_a_hung_collective_times_out(results):
    name, message, seconds = results[0]["timeout"]
    assert seconds < 30, (name, message)
    assert "timed out" in message.lower() or "timeout" in message.lower(), message
