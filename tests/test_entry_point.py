"""The ``xtuner`` command answers at once: the light modes, every mode's ``-h`` and argument
errors import none of the heavy libraries, and a plain ``xtuner train`` never imports
DeepSpeed. Each case runs in a fresh interpreter and reads that interpreter's own
``sys.modules`` (a structural check, not a timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from xtuner.entry_point import MODES

HEAVY = ("torch", "transformers", "peft", "datasets", "deepspeed", "mmengine.runner")
MARK = "XTUNER_IMPORTED "
# Runs the command in this interpreter, then prints which heavy modules it imported.
WRAPPER = f"""
import json, sys
from xtuner.entry_point import cli
try:
    code = cli(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print({MARK!r} + json.dumps(dict(
    code=code, modules=[m for m in sys.modules if m in {HEAVY!r} or m == "mmengine"])))
"""


def run_cli(*argv: str, env: dict | None = None, timeout: int = 120) -> tuple[int, list, str]:
    """Runs ``xtuner ARGV`` in a fresh interpreter: (exit status, heavy modules, output)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, *argv],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith(MARK)]
    assert lines, (out.stdout[-2000:], out.stderr[-3000:])
    result = json.loads(lines[-1][len(MARK) :])
    return result["code"], result["modules"], out.stdout + out.stderr


# Modes whose module takes sub-commands, each with its own arguments.
SUBCOMMANDS = {"convert": ["pth_to_hf", "merge"]}
ARG_MODES = [m for m, (module, _) in MODES.items() if module is not None]
HELP_CASES = [[m, "-h"] for m in ARG_MODES] + [
    [m, sub, "-h"] for m, subs in SUBCOMMANDS.items() for sub in subs
]
# A mistyped flag, and a call without the required positional arguments.
BAD_CASES = (
    [[m, "--no-such-flag"] for m in ARG_MODES]
    + [[m, sub, "--no-such-flag"] for m, subs in SUBCOMMANDS.items() for sub in subs]
    + [["train"], ["copy-cfg"], ["convert", "pth_to_hf"], ["check-loss"]]
)


@pytest.mark.parametrize(
    "argv",
    [
        ["help"],
        ["version"],
        ["list-cfg"],
        ["list-cfg", "-p", "demo"],
        ["list-dataset-format"],
        ["no-such-mode"],
    ],
    ids=" ".join,
)
def test_light_modes_import_nothing_heavy(argv):
    code, modules, out = run_cli(*argv)
    assert code == (2 if argv == ["no-such-mode"] else 0), out
    assert not set(modules) & set(HEAVY), f"xtuner {' '.join(argv)} imported {modules}"
    if argv[0] != "list-dataset-format":  # the map function registry is mmengine's
        assert "mmengine" not in modules, f"xtuner {' '.join(argv)} imported mmengine"


def test_copy_cfg_imports_nothing_heavy(tmp_path):
    code, modules, out = run_cli("copy-cfg", "demo_tiny_llama_full_alpaca", str(tmp_path))
    assert code == 0, out
    assert (tmp_path / "demo_tiny_llama_full_alpaca_copy.py").exists()
    assert not set(modules) & {*HEAVY, "mmengine"}, modules


@pytest.mark.parametrize("argv", HELP_CASES, ids=" ".join)
def test_every_modes_help_imports_nothing_heavy(argv):
    code, modules, out = run_cli(*argv)
    assert code == 0, out
    assert "usage:" in out
    assert not set(modules) & set(HEAVY), f"xtuner {' '.join(argv)} imported {modules}"


@pytest.mark.parametrize("argv", BAD_CASES, ids=" ".join)
def test_argument_errors_come_before_heavy_imports(argv):
    code, modules, out = run_cli(*argv)
    assert code == 2, out
    assert "usage:" in out and "Traceback" not in out
    assert not set(modules) & set(HEAVY), f"xtuner {' '.join(argv)} imported {modules}"


def test_check_loss_rejects_a_bad_baseline_before_torch():
    code, modules, out = run_cli("check-loss", "demo_tiny_llama_full_alpaca", "--baseline", "(")
    assert code == 1 and "--baseline" in out, out
    assert not set(modules) & set(HEAVY), modules


@pytest.mark.slow
def test_plain_train_does_not_import_deepspeed(tmp_path):
    """The demo config end to end (its hooks save an HF model too), without --deepspeed."""
    options = ["train_cfg.max_epochs=None", "train_cfg.max_iters=2"]
    code, modules, out = run_cli(
        "train",
        "demo_tiny_llama_full_alpaca",
        "--work-dir",
        str(tmp_path / "work"),
        "--cfg-options",
        *options,
        env={"XTUNER_DEMO_DIR": str(tmp_path / "demo"), "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert code == 0, out[-3000:]
    assert (tmp_path / "work" / "hf_model" / "config.json").exists()
    assert {"torch", "mmengine.runner"} <= set(modules)  # it did train
    assert "deepspeed" not in modules
