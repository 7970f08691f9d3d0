"""The bundled upstream-style sequence-parallel config trains with ``NPROC_PER_NODE=2 xtuner
train`` on CPU, with plain torchrun (DDP) and with ``--deepspeed deepspeed_zero2``."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from xtuner.configs import cfgs_name_path

CONFIG = "demo_tiny_llama_full_alpaca_sp2"
HERE = osp.dirname(osp.abspath(__file__))
_spec = importlib.util.spec_from_file_location("sp_worker", osp.join(HERE, "sp_worker.py"))
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)


def bundled_config() -> str:
    """The bundled config itself, checked to be written the upstream sequence-parallel way."""
    path = cfgs_name_path[CONFIG]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    for required in (
        "sequence_parallel_size = 2",
        "accumulative_counts *= sequence_parallel_size",
        "type=SequenceParallelSampler",
    ):
        assert required in text
    return path


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> str:
    """Where the config builds its tiny model (once for both tests)."""
    return str(tmp_path_factory.mktemp("sp2_demo_assets"))


def logged(work_dir: str) -> list[dict]:
    runs = sorted(glob.glob(osp.join(work_dir, "2*", "vis_data", "scalars.json")))
    assert runs, f"no scalars.json under {work_dir}"
    with open(runs[-1], encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize(
    "deepspeed",
    # ZeRO-2 under sequence parallel takes minutes on 2 CPU cores: make test-all runs it.
    [None, pytest.param("deepspeed_zero2", marks=pytest.mark.slow_all)],
)
def test_sp2_config_trains_with_torchrun(tmp_path, demo_dir, deepspeed):
    work_dir = str(tmp_path / "work")
    args = [
        sys.executable,
        "-m",
        "xtuner.entry_point",
        "train",
        bundled_config(),
    ]
    args += ["--work-dir", work_dir, "--seed", "0"]
    if deepspeed:
        args += ["--deepspeed", deepspeed]
    args += [
        "--cfg-options",
        "train_cfg.max_iters=3",
        "train_cfg.max_epochs=None",
        "default_hooks.logger.interval=1",
        "default_hooks.checkpoint.save_last=False",
        "custom_hooks.1.max_new_tokens=2",
    ]
    env = dict(
        os.environ,
        NPROC_PER_NODE="2",
        PORT=str(worker.free_port()),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        XTUNER_DEMO_DIR=demo_dir,
    )
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    assert "xtuner_ulysses_sdpa" in out.stdout + out.stderr
    records = logged(work_dir)
    assert len(records) == 3
    assert all(0 < r["loss"] < 20 for r in records)
