"""`xtuner train` with attn_implementation='flex_attention' on the CPU: an upstream-style config
builds (the build-time probes run on sdpa) and the first training step is refused with one
paragraph and the way out, exit status 1, no traceback."""

from __future__ import annotations

import pytest

from tests.tools.test_train_cli import CONSTANT_LR, run_xtuner, write_config

FLEX = ",\n        attn_implementation='flex_attention'"


@pytest.mark.slow_all  # ~35 s: the chat hook's generation before training compiles flex
def test_flex_training_on_the_cpu_exits_with_the_way_out(tmp_path, demo_assets):
    cfg = write_config(
        tmp_path,
        demo_assets,
        max_iters=2,
        use_varlen_attn=True,
        param_scheduler=CONSTANT_LR,
        quantization=FLEX,  # the template's slot after torch_dtype in the llm dict
    )
    out = run_xtuner("train", cfg, "--work-dir", str(tmp_path / "w"), env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode == 1, out.stderr[-3000:]
    message = " ".join(out.stderr.split())
    assert (
        "LlamaForCausalLM uses attn_implementation='flex_attention', which cannot train" in message
    )
    assert "on a CUDA GPU" in message and "attn_implementation='sdpa'" in message
    assert "Traceback" not in out.stderr
