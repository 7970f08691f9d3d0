"""tools/gpu_check.py on a machine without CUDA: it says so and exits 0; its table and its
handling of skipped and failing checks; the bodies of the flash-attention and autocast
checks run on the CPU (sdpa, CPU autocast; flex-attention up to its backward, which torch
has only on the GPU), so the GPU session runs tested code."""

from __future__ import annotations

import importlib.util
import os.path as osp
import subprocess
import sys

import pytest
import torch

SCRIPT = osp.join(
    osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), "tools", "gpu_check.py"
)
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # its dataclass looks its module up
_spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the checks would run")
def test_without_cuda_it_reports_and_exits_0():
    out = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no CUDA device here" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: it would run")
def test_packed_attention_benchmark_without_cuda_says_so(capsys):
    path = osp.join(osp.dirname(osp.dirname(SCRIPT)), "benchmarks", "bench_packed_attention.py")
    spec = importlib.util.spec_from_file_location("bench_packed_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main([]) == 0
    assert "no CUDA device here" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # flex has no CPU backward
        bench.main(["--device", "cpu"])


def test_checks_are_skipped_failed_or_ok_and_tabulated(monkeypatch, tmp_path):
    def missing(tmp):
        gpu_check._need("no_such_module_xyz", "no-such-wheel")

    def broken(tmp):
        raise ValueError("values differ\nsecond line")

    def fine(tmp):
        return "all equal\n\n| a | b |\n|---|---|"

    monkeypatch.setattr(gpu_check, "CHECKS", {"missing": missing, "broken": broken, "fine": fine})
    results = gpu_check.run_checks(["missing", "broken", "fine"], str(tmp_path))
    assert [r.status for r in results] == ["skipped", "FAIL", "ok"]
    assert "pip install no-such-wheel" in results[0].detail
    table = gpu_check.summary(results, "a GPU")
    assert "| missing | skipped | needs no-such-wheel (pip install no-such-wheel) |" in table
    assert "| broken | FAIL | ValueError: values differ |" in table
    assert table.rstrip().endswith("fine:\n| a | b |\n|---|---|")


def test_packed_check_body_on_the_cpu(tiny_llama_path):
    err = gpu_check.packed_equals_separate(tiny_llama_path, "cpu", "sdpa", "float32")
    assert err < 1e-4


def test_flex_check_body_on_the_cpu_runs_up_to_the_backward(tiny_llama_path, uncompiled_flex):
    """The flex check's body on the CPU: built, the documents compared without gradients on
    flex (uncompiled, see the fixture), then the training step is refused (no CPU backward)."""
    with pytest.raises(ValueError, match="'flex_attention', which cannot train on the CPU"):
        gpu_check.packed_equals_separate(tiny_llama_path, "cpu", "flex_attention", "float32")
    assert uncompiled_flex


def test_flex_check_is_skipped_without_flex_attention(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec

    def without_flex(name, *args):
        return None if name == "torch.nn.attention.flex_attention" else find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_flex)
    (result,) = gpu_check.run_checks(["flex-attn"], str(tmp_path))
    assert (result.status, result.detail) == (
        "skipped",
        "needs torch>=2.5 (pip install torch>=2.5)",
    )


def test_autocast_check_body_on_the_cpu(tiny_llama_path):
    dtypes, err = gpu_check.autocast_head_gemms(tiny_llama_path, "cpu")
    assert dtypes == {torch.bfloat16}
    assert err < 2e-2
