"""Each mmengine/torch/deepspeed/setuptools fix of xtuner._compat, shown to be needed."""

from __future__ import annotations

import importlib
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

import xtuner  # noqa: F401  (applies the patches)
from xtuner import _compat


def _checkpoint(path):
    torch.save({"message_hub": {"loss": HistoryBuffer([1.0], [1])}, "meta": np.float64(1.0)}, path)


def test_trusted_checkpoint_loads_with_mmengine_objects(tmp_path):
    path = tmp_path / "ckpt" / "iter_1.pth"
    path.parent.mkdir()
    _checkpoint(path)
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path)  # torch's default: the failure the fix is for
    with pytest.raises(Exception, match="Weights only load failed"):
        CheckpointLoader.load_checkpoint(str(path))  # untrusted paths keep the safe default
    _compat.trust_checkpoint_path(str(path.parent))
    loaded = CheckpointLoader.load_checkpoint(str(path))
    assert isinstance(loaded["message_hub"]["loss"], HistoryBuffer)


def test_cpu_distributed_init_and_ddp_without_device_ids(tmp_path):
    """One gloo process through mmengine's own init_dist and DDP wrapper."""
    script = tmp_path / "run.py"
    script.write_text(
        "import os, torch\n"
        "import xtuner\n"
        "from mmengine.dist import init_dist, get_world_size\n"
        "from mmengine.model.wrappers import MMDistributedDataParallel\n"
        "from mmengine.model import BaseModel\n"
        "os.environ.update(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',"
        " MASTER_PORT=os.environ['PORT'])\n"
        "init_dist('pytorch')\n"
        "class M(BaseModel):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.l = torch.nn.Linear(2, 2)\n"
        "    def forward(self, x, mode='tensor'): return self.l(x)\n"
        "ddp = MMDistributedDataParallel(module=M(), device_ids=[0])\n"
        "print('ok', get_world_size())\n"
    )
    import random

    env = dict(__import__("os").environ, PORT=str(random.randint(30000, 39999)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert "ok 1" in out.stdout, out.stderr[-2000:]


def test_unpatched_init_dist_fails_on_cpu():
    """Without the fix, mmengine calls torch.cuda.set_device on a CPU-only torch."""
    original = _compat._ORIGINAL["init_dist_pytorch"]
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the unpatched path works here")
    import os

    env = dict(os.environ)
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    try:
        with pytest.raises((AttributeError, RuntimeError, AssertionError)):
            original("gloo")
    finally:
        os.environ.clear()
        os.environ.update(env)


def test_deepspeed_onebit_stand_in():
    pytest.importorskip("deepspeed")
    if importlib.util.find_spec("deepspeed.runtime.fp16.onebit") is None:
        pytest.fail("the import hook should make the module findable")
    from mmengine._strategy.deepspeed import register_deepspeed_optimizers

    names = register_deepspeed_optimizers()
    assert "FusedAdam" in names
    onebit = importlib.import_module("deepspeed.runtime.fp16.onebit")
    if getattr(onebit, "__spec__", None) and isinstance(
        onebit.__spec__.loader, _compat._OnebitFallbackFinder
    ):
        with pytest.raises(RuntimeError, match="removed from deepspeed"):
            onebit.OnebitAdam()


def test_deepspeed_onebit_is_missing_without_the_hook():
    pytest.importorskip("deepspeed")
    code = (
        "import importlib.util, sys\n"
        "print(importlib.util.find_spec('deepspeed.runtime.fp16.onebit') is None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "True", "deepspeed ships onebit again"


def test_pkg_resources_free_package_lookup():
    import mmengine.utils.package_utils as pkg_utils

    assert importlib.util.find_spec("pkg_resources") is None  # what the fix is for
    assert pkg_utils.is_installed("mmengine")
    assert pkg_utils.get_installed_path("mmengine").endswith("mmengine")
    assert not pkg_utils.is_installed("surely_not_a_package_xyz")


def test_config_module_uses_the_fixed_lookup():
    """mmengine.config resolves ``pkg::`` paths with its own imported names: patched too."""
    import mmengine.config.config as config_mod

    assert config_mod.is_installed("mmengine")
    assert config_mod.get_installed_path("mmengine").endswith("mmengine")


def test_amp_optim_wrapper_swapped_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("GPU machine: AmpOptimWrapper stays")
    from mmengine.optim import AmpOptimWrapper

    model = torch.nn.Linear(2, 2)
    with pytest.raises(AssertionError):
        AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    cfg = Config(
        dict(
            optim_wrapper=dict(type=AmpOptimWrapper, optimizer=dict(type="SGD"), dtype="float16"),
            model=dict(llm=dict(attn_implementation="flash_attention_2")),
        )
    )
    changes = _compat.adapt_config_to_device(cfg)
    assert cfg.optim_wrapper.type == "OptimWrapper" and "dtype" not in cfg.optim_wrapper
    assert cfg.model.llm.attn_implementation == "sdpa"
    assert len(changes) == 2


def test_train_loop_restarts_epochs_without_mmengines_sleep():
    """mmengine's iterator sleeps 2 s at each epoch end; TrainLoop's does not."""
    import time

    from mmengine.runner.loops import _InfiniteDataloaderIterator
    from torch.utils.data import DataLoader

    from xtuner.engine.runner.loops import _EpochIterator

    loader = DataLoader(list(range(2)), batch_size=2)
    start = time.perf_counter()
    ours = _EpochIterator(loader)
    batches = [next(ours) for _ in range(4)]
    assert time.perf_counter() - start < 1.0 and ours.epoch == 3
    assert all(b.tolist() == [0, 1] for b in batches)
    start = time.perf_counter()
    theirs = _InfiniteDataloaderIterator(loader)
    for _ in range(2):
        next(theirs)
    assert time.perf_counter() - start >= 2.0  # the sleep the fix avoids


def _checkpoint_hook(work_dir: str, max_keep: int):
    from collections import deque

    from mmengine.hooks import CheckpointHook

    hook = CheckpointHook(interval=1, by_epoch=False, max_keep_ckpts=max_keep)
    from mmengine.fileio import get_file_backend

    hook.out_dir = work_dir
    hook.file_backend = get_file_backend(work_dir)  # as mmengine's before_train makes them
    hook.keep_ckpt_ids = deque([], max_keep)
    return hook


class _Runner:
    """What CheckpointHook's save uses of a runner; ``crash_at`` dies half-way through a save."""

    def __init__(self, work_dir: str, crash_at: int | None = None):
        from mmengine.logging import MessageHub

        self.work_dir = work_dir
        self.crash_at = crash_at
        self.message_hub = MessageHub.get_instance("test_atomic_checkpoints")

    def save_checkpoint(self, out_dir, filename, *args, meta=None, **kwargs):
        path = osp.join(out_dir, filename)
        with open(path, "w") as f:
            f.write("half a checkpoint" if meta["step"] == self.crash_at else "whole")
        if meta["step"] == self.crash_at:
            raise KeyboardInterrupt("killed while writing")


def test_checkpoints_are_written_atomically(tmp_path):
    """A save that dies half-way leaves last_checkpoint on the previous, whole checkpoint,
    which max_keep_ckpts=1 has not deleted; the next save cleans the partial file up."""
    _compat.apply_patches()
    work = str(tmp_path)
    pointer = tmp_path / "last_checkpoint"
    hook = _checkpoint_hook(work, max_keep=1)
    hook._save_checkpoint_with_step(_Runner(work), 1, {"step": 1})
    assert pointer.read_text() == osp.join(work, "iter_1.pth")
    with pytest.raises(KeyboardInterrupt):
        hook._save_checkpoint_with_step(_Runner(work, crash_at=2), 2, {"step": 2})
    assert pointer.read_text() == osp.join(work, "iter_1.pth")
    assert (tmp_path / "iter_1.pth").read_text() == "whole"
    assert not (tmp_path / "iter_2.pth").exists()

    resumed = _checkpoint_hook(work, max_keep=1)
    resumed.keep_ckpt_ids.append(1)
    resumed._save_checkpoint_with_step(_Runner(work), 2, {"step": 2})
    assert pointer.read_text() == osp.join(work, "iter_2.pth")
    assert sorted(os.listdir(work)) == ["iter_2.pth", "last_checkpoint"]


def _modules_after(code: str) -> dict:
    """Runs ``code`` in a fresh interpreter; it prints one JSON line last."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return __import__("json").loads(out.stdout.strip().splitlines()[-1])


# A minute of imports in subprocesses; CI keeps test_plain_train_does_not_import_deepspeed
# and test_unpatched_model_unwrapping_imports_deepspeed, make test-all runs this one too.
@pytest.mark.slow_all
def test_runner_defers_deepspeed_and_bitsandbytes_until_used():
    """mmengine imports both with every runner import; with the fix each comes when used."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("bitsandbytes")
    seen = _modules_after(
        "import json, sys\n"
        "import torch\n"
        "import xtuner\n"
        "from mmengine.runner import FlexibleRunner, Runner\n"
        "from accelerate.utils import extract_model_from_parallel\n"
        "from mmengine.registry import OPTIMIZERS\n"
        "seen = {}\n"
        "loaded = lambda: sorted(m for m in ('deepspeed', 'bitsandbytes') if m in sys.modules)\n"
        "seen['runner'] = loaded()\n"
        "model = torch.nn.Linear(2, 2)\n"
        "assert extract_model_from_parallel(model) is model  # what save_pretrained calls\n"
        "seen['unwrap'] = loaded()\n"
        "seen['adamw'] = OPTIMIZERS.get('AdamW').__module__\n"
        "seen['bnb'] = OPTIMIZERS.get('PagedAdamW8bit').__module__\n"
        "seen['bnb_loaded'] = loaded()\n"
        "from mmengine._strategy import DeepSpeedStrategy\n"
        "DeepSpeedStrategy(config=dict(train_micro_batch_size_per_gpu=1))\n"
        "seen['strategy'] = loaded()\n"
        "seen['fused_adam'] = 'FusedAdam' in OPTIMIZERS\n"
        "print(json.dumps(seen))\n"
    )
    assert seen["runner"] == [] and seen["unwrap"] == []
    assert seen["adamw"].startswith("torch.optim")
    assert seen["bnb"].startswith("bitsandbytes") and seen["bnb_loaded"] == ["bitsandbytes"]
    assert seen["strategy"] == ["bitsandbytes", "deepspeed"] and seen["fused_adam"]
    unpatched = _modules_after(
        "import json, sys\n"
        "from mmengine.runner import Runner\n"
        "print(json.dumps(sorted(m for m in ('deepspeed', 'bitsandbytes') if m in sys.modules)))\n"
    )
    assert unpatched == ["bitsandbytes", "deepspeed"]  # what the fix is for


def test_unpatched_model_unwrapping_imports_deepspeed():
    pytest.importorskip("deepspeed")
    unpatched = _modules_after(
        "import sys, torch\n"
        "from accelerate.utils import extract_model_from_parallel\n"
        "extract_model_from_parallel(torch.nn.Linear(2, 2))\n"
        "print(str('deepspeed' in sys.modules).lower())\n"
    )
    assert unpatched is True  # every HF save_pretrained would import it


def test_fixes_apply_when_mmengine_is_imported_after_xtuner():
    """``import xtuner`` imports no mmengine; the import hook fixes each module as it loads
    (the in-process tests above cover mmengine imported first)."""
    seen = _modules_after(
        "import json, sys\n"
        "import xtuner\n"
        "from xtuner import _compat\n"
        "before = 'mmengine' in sys.modules or 'torch' in sys.modules\n"
        "import mmengine.config.config as config_mod\n"
        "import mmengine.dist.utils as dist_utils\n"
        "import mmengine.utils.package_utils as pkg_utils\n"
        "from mmengine.model.wrappers import MMDistributedDataParallel\n"
        "from mmengine.runner.checkpoint import CheckpointLoader\n"
        "print(json.dumps([before,\n"
        "    pkg_utils.is_installed is _compat.is_installed,\n"
        "    config_mod.get_installed_path is _compat.get_installed_path,\n"
        "    dist_utils._init_dist_pytorch is _compat._init_dist_pytorch_cpu_aware,\n"
        "    getattr(MMDistributedDataParallel.__init__, '_xtuner_cpu_aware', False),\n"
        "    CheckpointLoader._schemes[''] is _compat.load_local_checkpoint]))\n"
    )
    assert seen == [False, True, True, True, True, True]
