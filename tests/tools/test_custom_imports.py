"""``custom_imports``: a user's module registers a loss, a map function, a prompt template and
a hook, and every tool that reads the config (train, check-loss, log-dataset,
check-custom-dataset) finds them, with the module in the config's folder or in the current
directory. Run through the console script, whose ``sys.path`` has neither folder."""

from __future__ import annotations

import importlib.util
import json
import os.path as osp

import pytest

_here = osp.dirname(osp.abspath(__file__))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, osp.join(_here, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_matrix = _load("test_config_matrix")
run_console_script, logged = _matrix.run_console_script, _matrix.logged
write_config = _matrix.write_config

USER_MODULE = """
import os

import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from xtuner.model.losses import TokenLoss
from xtuner.registry import LOSSES, MAP_FUNC
from xtuner.utils import PROMPT_TEMPLATE

PROMPT_TEMPLATE["my_chat"] = dict(
    SYSTEM="[SYS]{system}[/SYS]\\n",
    INSTRUCTION="[Q]{input}[/Q]\\n[A]",
    SUFFIX="<|im_end|>",
    SUFFIX_AS_EOS=True,
    STOP_WORDS=["<|im_end|>"],
)


@MAP_FUNC.register_module()
def my_qa_map_fn(example):
    return {"conversation": [{"input": example["q"], "output": example["a"]}]}


@LOSSES.register_module()
class MyCELoss(TokenLoss):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        print("MY_LOSS_BUILT", flush=True)

    def token_loss(self, logits, targets, extras):
        return F.cross_entropy(logits, targets, reduction="none")


@HOOKS.register_module()
class MyMarkerHook(Hook):
    def __init__(self, path):
        self.path = path

    def before_train(self, runner):
        with open(self.path, "w") as f:
            f.write("ran")
"""


def write_user_config(folder, assets, data_path, marker) -> str:
    path = write_config(
        folder,
        assets,
        name="user.py",
        max_iters=2,
        save_steps=2,
        param_scheduler="[]",
        loss=",\n    loss=dict(type='MyCELoss')",
        header="custom_imports = dict(imports=['my_parts'], allow_failed_imports=False)",
    )
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert "dataset_map_fn=alpaca_map_fn" in text and "PROMPT_TEMPLATE.qwen_chat" in text
    text = text.replace("dataset_map_fn=alpaca_map_fn", "dataset_map_fn='my_qa_map_fn'")
    text = text.replace("PROMPT_TEMPLATE.qwen_chat", "PROMPT_TEMPLATE.my_chat")
    text = text.replace(f"'{assets['data']}'", repr(data_path))
    text = text.replace(
        "    dict(type=ThroughputHook),\n",
        f"    dict(type=ThroughputHook),\n    dict(type='MyMarkerHook', path={str(marker)!r}),\n",
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@pytest.fixture()
def layout(tmp_path, demo_assets):
    """A q/a data file and two folders: ``config_dir`` and ``elsewhere``."""
    data = tmp_path / "qa.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i in range(40):
            f.write(json.dumps({"q": f"add {i} and {i}", "a": str(2 * i)}) + "\n")
    (tmp_path / "config_dir").mkdir()
    (tmp_path / "elsewhere").mkdir()
    return tmp_path, str(data), demo_assets


@pytest.mark.slow
@pytest.mark.parametrize(
    "module_in",
    # One layout in CI (each runs every tool); make test-all runs both.
    [pytest.param("config_dir", marks=pytest.mark.slow_all), "cwd"],
)
def test_every_tool_finds_the_user_module(layout, module_in):
    root, data, assets = layout
    config_dir, elsewhere = root / "config_dir", root / "elsewhere"
    # The module is beside the config, or in the directory the user runs xtuner from.
    module_dir = config_dir if module_in == "config_dir" else elsewhere
    (module_dir / "my_parts.py").write_text(USER_MODULE)
    marker = root / "hook_ran"
    cfg = write_user_config(config_dir, assets, data, marker)
    cwd = str(elsewhere)

    work_dir = str(root / "work")
    out = run_console_script("train", cfg, "--work-dir", work_dir, "--seed", "0", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MY_LOSS_BUILT" in out.stdout
    assert marker.read_text() == "ran"
    assert len(logged(work_dir, "loss")) == 2

    out = run_console_script("log-dataset", cfg, "--show", "text", "--num", "1", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "[Q]add" in out.stdout and "[/Q]\n[A]" in out.stdout, out.stdout[-2000:]

    out = run_console_script("check-custom-dataset", cfg, cwd=cwd)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    if module_in == "config_dir":
        out = run_console_script(
            "check-loss", cfg, "--batches", "1", "--steps", "2", "--out", str(root / "chk"), cwd=cwd
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert "MY_LOSS_BUILT" in out.stdout


def test_missing_module_names_it_and_the_folders(layout):
    root, data, assets = layout
    cfg = write_user_config(root / "config_dir", assets, data, root / "marker")
    out = run_console_script("log-dataset", cfg, cwd=str(root / "elsewhere"))
    assert out.returncode == 1
    message = out.stderr
    assert "custom_imports could not import 'my_parts'" in message, message
    assert str(root / "config_dir") in message and str(root / "elsewhere") in message
    assert "Traceback" not in message
