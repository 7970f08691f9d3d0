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


def write_config(tmp_path, assets: dict) -> str:
    """The bundled config with its demo-asset lines pointed at the test's tiny model."""
    with open(cfgs_name_path[CONFIG], encoding="utf-8") as f:
        text = f.read()
    start = text.index("demo_root = ")
    end = text.index('data_path = demo["data"]\n') + len('data_path = demo["data"]\n')
    paths = f"pretrained_model_name_or_path = {assets['model']!r}\ndata_path = {assets['data']!r}\n"
    text = text[:start] + paths + text[end:]
    text = text.replace("import os\n", "").replace("from xtuner.demo import prepare_demo\n", "")
    for required in (
        "sequence_parallel_size = 2",
        "accumulative_counts *= sequence_parallel_size",
        "type=SequenceParallelSampler",
    ):
        assert required in text
    path = tmp_path / "sp2.py"
    path.write_text(text)
    return str(path)


def logged(work_dir: str) -> list[dict]:
    runs = sorted(glob.glob(osp.join(work_dir, "2*", "vis_data", "scalars.json")))
    assert runs, f"no scalars.json under {work_dir}"
    with open(runs[-1], encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "loss" in r]


@pytest.mark.multiproc
@pytest.mark.slow
@pytest.mark.parametrize("deepspeed", [None, "deepspeed_zero2"])
def test_sp2_config_trains_with_torchrun(tmp_path, demo_assets, deepspeed):
    work_dir = str(tmp_path / "work")
    args = [
        sys.executable,
        "-m",
        "xtuner.entry_point",
        "train",
        write_config(tmp_path, demo_assets),
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
    )
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    assert "xtuner_ulysses_sdpa" in out.stdout + out.stderr
    records = logged(work_dir)
    assert len(records) == 3
    assert all(0 < r["loss"] < 20 for r in records)
