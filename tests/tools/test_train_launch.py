"""Launching ``xtuner train`` on several processes and nodes, and surviving a dead rank.

``--launcher slurm`` runs in a faked srun environment (the ``SLURM_*`` variables srun sets
and a stand-in ``scontrol``); ``NNODES=2`` runs two torchrun groups on this machine; a rank
killed with ``kill -9`` (mid-run, or in the middle of writing a checkpoint file) ends the job,
and ``--resume`` continues as if nothing happened; a NaN loss on one rank is raised or skipped
on every rank alike; a rank that hangs ends the job with a timeout.
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


#: the config of the kill tests also loads tests/tools/pause_in_save.py, which does nothing
#: unless its XTUNER_TEST_PAUSE_* variables are set.
PAUSE_IMPORT = "custom_imports = dict(imports=['pause_in_save'], allow_failed_imports=False)\n"


def _launch(cfg: str, work: str, deepspeed: str | None, *more: str, **env: str):
    extra = ["--deepspeed", deepspeed] if deepspeed else []
    path = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))
    env = _env(NPROC_PER_NODE="2", PORT=str(random.randint(20000, 29999)), PYTHONPATH=path, **env)
    args = _xtuner("train", cfg, "--work-dir", work, "--seed", "0", *extra, *more)
    return subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_assets):
    """The config of the kill tests (8 iterations, a checkpoint every 2) and its work dir
    after an uninterrupted 2-rank run, one per DeepSpeed setting."""
    runs = {}

    def run(deepspeed: str | None) -> tuple[str, str]:
        if deepspeed not in runs:
            tmp = tmp_path_factory.mktemp("uninterrupted")
            cfg = write_config(
                tmp, demo_assets, max_iters=8, save_steps=2, param_scheduler=CONSTANT_LR,
                header=PAUSE_IMPORT,
            )  # fmt: skip
            reference = str(tmp / "reference")
            ((rc, err),) = _wait_all([_launch(cfg, reference, deepspeed)])
            assert rc == 0, err[-2000:]
            runs[deepspeed] = cfg, reference
        return runs[deepspeed]

    return run


def _kill_until_exit(job: subprocess.Popen, pid: int) -> str:
    """``kill -9`` of ``pid`` (one rank of ``job``): the job must exit non-zero within 2
    minutes. Returns its stderr."""
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    rc = job.wait(timeout=180)
    assert rc != 0 and time.monotonic() - killed < 120
    return job.stderr.read()


def _resume_reproduces(
    cfg: str, work: str, reference: str, deepspeed: str | None, most: int, *more: str
) -> None:
    """``--resume`` in ``work`` gives the rest of ``reference``'s loss curve (at most
    ``most`` iterations of it: it started from a checkpoint) and its final weights."""
    ((rc, err),) = _wait_all([_launch(cfg, work, deepspeed, "--resume", *more)])
    assert rc == 0, err[-2000:]
    expected = losses_of(reference)
    resumed = losses_of(work)
    assert resumed == pytest.approx(expected[-len(resumed) :], rel=1e-5)
    assert len(resumed) <= most
    ref, got = _final_weights(reference), _final_weights(work)
    assert sorted(ref) == sorted(got)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)


@pytest.mark.multiproc
@pytest.mark.slow_all
@pytest.mark.parametrize(
    "deepspeed", [None, "deepspeed_zero2", "deepspeed_zero3"], ids=["ddp", "zero2", "zero3"]
)
def test_kill_9_of_one_rank_then_resume(tmp_path, uninterrupted, deepspeed):
    cfg, reference = uninterrupted(deepspeed)
    work = str(tmp_path / "work")
    job = _launch(cfg, work, deepspeed)
    deadline = time.monotonic() + 600
    while not osp.exists(osp.join(work, "iter_4.pth")):
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-2000:]
        time.sleep(0.2)
    (torchrun,) = _children(job.pid)
    ranks = _children(torchrun)
    assert len(ranks) == 2
    assert "Signal 9 (SIGKILL)" in _kill_until_exit(job, ranks[-1])
    _resume_reproduces(cfg, work, reference, deepspeed, most=6)


@pytest.mark.multiproc
@pytest.mark.slow_all
@pytest.mark.parametrize(
    "deepspeed, rank", [(None, 0), ("deepspeed_zero2", 1)], ids=["ddp", "zero2"]
)
def test_kill_9_during_a_checkpoint_write_then_resume(tmp_path, uninterrupted, deepspeed, rank):
    """One rank is killed while it is writing iter_6's checkpoint (half of a file's bytes on
    disk: DDP's only file on rank 0, a ZeRO-2 optimizer shard on rank 1). With
    save_total_limit 1, last_checkpoint stays on iter_4, which is still there, and --resume
    from it still gives the uninterrupted run's losses and weights."""
    cfg, reference = uninterrupted(deepspeed)
    work = str(tmp_path / "work")
    marker = tmp_path / "paused"
    keep_one = ("--cfg-options", "default_hooks.checkpoint.max_keep_ckpts=1")
    # (the first write of any file of iteration 6: mmengine alone would write iter_6.pth in
    # place, after deleting iter_4.pth)
    job = _launch(
        cfg, work, deepspeed, *keep_one, XTUNER_TEST_PAUSE_IN="iter_6.pth",
        XTUNER_TEST_PAUSE_RANK=str(rank), XTUNER_TEST_PAUSE_MARKER=str(marker),
    )  # fmt: skip
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-2000:]
        time.sleep(0.2)
    pid, paused_path = marker.read_text().splitlines()[:2]
    (torchrun,) = _children(job.pid)
    assert int(pid) in _children(torchrun)
    _kill_until_exit(job, int(pid))

    # last_checkpoint still names the previous checkpoint, which save_total_limit 1 kept
    with open(osp.join(work, "last_checkpoint"), encoding="utf-8") as f:
        assert f.read() == osp.join(work, "iter_4.pth")
    assert sorted(glob.glob(osp.join(work, "iter_*.pth"))) == [osp.join(work, "iter_4.pth")]
    # the killed write left a broken file, under the temporary name only
    assert ".iter_6.pth.partial" in paused_path and osp.exists(paused_path)
    with pytest.raises(RuntimeError, match="zip archive"):
        torch.load(paused_path, weights_only=False)
    _resume_reproduces(cfg, work, reference, deepspeed, 4, *keep_one)
    assert not glob.glob(osp.join(work, ".*.partial"))  # the resumed run cleaned it up


# Faults on one rank (tests/tools/rank_faults.py), through ``xtuner train`` ----------------
FAULTS_IMPORT = "from rank_faults import HangOnOneRank, NaNOnOneRankLoss\n"


@pytest.mark.multiproc
@pytest.mark.slow_all
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nan_on_one_rank_is_decided_on_every_rank(tmp_path, demo_assets, policy):
    """The loss is NaN on rank 1 only, at iteration 2 (counted from 0)."""
    loss = f",\n    loss=dict(type=NaNOnOneRankLoss, rank=1, iteration=2, nonfinite={policy!r})"
    cfg = write_config(
        tmp_path, demo_assets, max_iters=4, save_steps=4, param_scheduler=CONSTANT_LR,
        loss=loss, header=FAULTS_IMPORT,
    )  # fmt: skip
    work = str(tmp_path / "work")
    ((rc, err),) = _wait_all([_launch(cfg, work, None)])
    bad = "'loss' (not finite on rank(s) [1]) at iteration 2"
    if policy == "raise":
        # rank 0, whose own loss was finite, stops too, naming the rank, term and iteration
        assert rc != 0
        assert f"xtuner train: error (rank 0): FloatingPointError: loss term {bad}" in err, err[
            -3000:
        ]
        return
    assert rc == 0, err[-2000:]
    # mmengine logs the running mean of the last 10 iterations: undo it
    logged = losses_of(work)
    losses = [(k + 1) * v - k * logged[k - 1] if k else v for k, v in enumerate(logged)]
    # both ranks dropped the term: the global-batch loss of that step is 0 (had rank 0 kept
    # its term, its finite value would show), and the others are finite and normal
    assert len(losses) == 4 and losses[2] == pytest.approx(0.0, abs=1e-4)
    assert all(v > 1 for v in losses[:2] + losses[3:]), losses
    with open(glob.glob(osp.join(work, "2*", "*.log"))[0], encoding="utf-8") as f:
        assert f"loss term {bad}: skipped for this step" in f.read()
    from xtuner.model.utils import load_checkpoint_state

    state = load_checkpoint_state(osp.join(work, "iter_4.pth"))
    assert state and all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.multiproc
@pytest.mark.slow
def test_a_rank_that_hangs_ends_the_job_with_a_timeout(tmp_path, demo_assets):
    """Rank 1 stops answering before iteration 2: with --dist-timeout 10, rank 0's next
    collective fails with a timeout error and the job exits non-zero instead of hanging."""
    cfg = write_config(
        tmp_path, demo_assets, max_iters=4, save_steps=4, param_scheduler=CONSTANT_LR,
        header=FAULTS_IMPORT,
    )  # fmt: skip
    with open(cfg, "a", encoding="utf-8") as f:
        f.write("custom_hooks += [dict(type=HangOnOneRank, rank=1, iteration=2)]\n")
    work = str(tmp_path / "work")
    start = time.monotonic()
    ((rc, err),) = _wait_all([_launch(cfg, work, None, "--dist-timeout", "10")])
    assert rc != 0 and time.monotonic() - start < 300
    assert "xtuner train: error (rank 0): " in err, err[-3000:]
    assert "timed out" in err.lower() or "timeout" in err.lower(), err[-3000:]
    with open(glob.glob(osp.join(work, "2*", "*.log"))[0], encoding="utf-8") as f:
        log = f.read()
    # it was the hang that timed out: iterations 0 and 1 trained, 2 never ended
    assert "Iter(train) [2/4]" in log and "Iter(train) [3/4]" not in log
