"""Launching ``xtuner train`` on several processes and nodes, and surviving a dead rank.

``--launcher slurm`` runs in a faked srun environment (the ``SLURM_*`` variables srun sets
and a stand-in ``scontrol``); ``NNODES=2`` runs two torchrun groups on this machine; a rank
killed with ``kill -9`` ends the job, and ``--resume`` continues as if nothing happened.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import os.path as osp
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

HERE = osp.dirname(osp.abspath(__file__))
_spec = importlib.util.spec_from_file_location("train_cli", osp.join(HERE, "test_train_cli.py"))
_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cli)
run_xtuner, write_config, losses_of = _cli.run_xtuner, _cli.write_config, _cli.losses_of
CONSTANT_LR = _cli.CONSTANT_LR


def _xtuner(*args: str) -> list[str]:
    return [sys.executable, "-m", "xtuner.entry_point", *args]


def _env(**extra: str) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)


def _wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]


def test_nnodes_without_address_is_refused(monkeypatch, capsys):
    from xtuner.entry_point import cli

    for key, value in dict(NNODES="2", NODE_RANK="0", ADDR="", PORT="29500").items():
        monkeypatch.setenv(key, value)
    assert cli(["train", "some_config.py"]) == 2
    assert "NNODES=2 needs ADDR and PORT" in capsys.readouterr().err


@pytest.mark.multiproc
@pytest.mark.slow
def test_slurm_launcher_in_a_faked_srun_environment(tmp_path, demo_assets):
    cfg = write_config(
        tmp_path, demo_assets, max_iters=2, save_steps=2, param_scheduler=CONSTANT_LR
    )
    # srun gives each task its SLURM_* variables; mmengine asks scontrol for the first node.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostname node[7-8]" ] && echo 127.0.0.1\n')
    scontrol.chmod(0o755)
    work = str(tmp_path / "work")
    slurm = dict(
        SLURM_NTASKS="2",
        SLURM_NODELIST="node[7-8]",
        MASTER_PORT=str(random.randint(20000, 29999)),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    args = _xtuner("train", cfg, "--launcher", "slurm", "--work-dir", work, "--seed", "0")
    procs = [
        subprocess.Popen(
            args,
            env=_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **slurm),
            stdout=subprocess.PIPE if r else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    results = _wait_all(procs)
    assert [rc for rc, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    log = glob.glob(osp.join(work, "2*", "*.log"))[0]
    with open(log, encoding="utf-8") as f:
        text = f.read()
    assert "Distributed launcher: slurm" in text and "Distributed training: True" in text
    assert "GPU number: 2" in text  # mmengine's name for the world size
    assert len(losses_of(work)) == 2
    assert osp.isfile(osp.join(work, "iter_2.pth"))


@pytest.mark.multiproc
@pytest.mark.slow_all
def test_two_nodes_on_one_machine(tmp_path, demo_assets):
    cfg = write_config(
        tmp_path, demo_assets, max_iters=3, save_steps=3, param_scheduler=CONSTANT_LR
    )
    work = str(tmp_path / "work")
    nodes = dict(
        NNODES="2", NPROC_PER_NODE="1", ADDR="127.0.0.1", PORT=str(random.randint(20000, 29999))
    )
    procs = [
        subprocess.Popen(
            _xtuner("train", cfg, "--work-dir", work, "--seed", "0"),
            env=_env(NODE_RANK=str(n), **nodes),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (0, 1)
    ]
    results = _wait_all(procs)
    assert [rc for rc, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    assert len(losses_of(work)) == 3
    assert osp.isfile(osp.join(work, "iter_3.pth"))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _final_weights(work: str) -> dict:
    from xtuner.model.utils import load_checkpoint_state

    return load_checkpoint_state(osp.join(work, "iter_8.pth"))


@pytest.mark.multiproc
@pytest.mark.slow_all
@pytest.mark.parametrize("deepspeed", [None, "deepspeed_zero2"], ids=["ddp", "zero2"])
def test_kill_9_of_one_rank_then_resume(tmp_path, demo_assets, deepspeed):
    cfg = write_config(
        tmp_path, demo_assets, max_iters=8, save_steps=2, param_scheduler=CONSTANT_LR
    )
    extra = ["--deepspeed", deepspeed] if deepspeed else []

    def launch(work: str, *more: str) -> subprocess.Popen:
        env = _env(NPROC_PER_NODE="2", PORT=str(random.randint(20000, 29999)))
        args = _xtuner("train", cfg, "--work-dir", work, "--seed", "0", *extra, *more)
        return subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    reference = str(tmp_path / "reference")
    ((rc, err),) = _wait_all([launch(reference)])
    assert rc == 0, err[-2000:]

    work = str(tmp_path / "work")
    job = launch(work)
    deadline = time.monotonic() + 600
    while not osp.exists(osp.join(work, "iter_4.pth")):
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-2000:]
        time.sleep(0.2)
    (torchrun,) = _children(job.pid)
    ranks = _children(torchrun)
    assert len(ranks) == 2
    os.kill(ranks[-1], signal.SIGKILL)
    killed = time.monotonic()
    rc = job.wait(timeout=180)
    assert rc != 0 and time.monotonic() - killed < 120
    assert "Signal 9 (SIGKILL)" in job.stderr.read()

    ((rc, err),) = _wait_all([launch(work, "--resume")])
    assert rc == 0, err[-2000:]
    expected = losses_of(reference)
    resumed = losses_of(work)
    assert resumed == pytest.approx(expected[-len(resumed) :], rel=1e-5)
    assert len(resumed) <= 6  # it started from a checkpoint, not from scratch
    ref, got = _final_weights(reference), _final_weights(work)
    assert sorted(ref) == sorted(got)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)
