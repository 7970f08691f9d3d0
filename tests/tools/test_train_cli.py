"""`xtuner` end to end: upstream-style configs train, failures exit non-zero, resume is exact."""

from __future__ import annotations

import glob
import json
import os
import os.path as osp
import random
import subprocess
import sys

import pytest

from xtuner.entry_point import cli

HERE = osp.dirname(osp.abspath(__file__))
CONSTANT_LR = "[]"
WARMUP_COSINE = (
    "[dict(type=LinearLR, start_factor=1e-5, by_epoch=False, begin=0, end=2), "
    "dict(type=CosineAnnealingLR, eta_min=0.0, by_epoch=False, begin=2, end=max_iters)]"
)


def write_config(
    tmp_path,
    assets,
    *,
    name="cfg.py",
    max_iters=8,
    save_steps=100,
    accumulative_counts=1,
    lora="None",
    loss="",
    use_varlen_attn=False,
    param_scheduler=WARMUP_COSINE,
    torch_dtype="torch.float32",
    quantization="",
    header="",
) -> str:
    with open(osp.join(HERE, "upstream_style_config.py.tmpl"), encoding="utf-8") as f:
        text = f.read()
    text = text.format(
        model_path=assets["model"],
        data_path=assets["data"],
        max_iters=max_iters,
        save_steps=save_steps,
        accumulative_counts=accumulative_counts,
        lora=lora,
        loss=loss,
        use_varlen_attn=use_varlen_attn,
        param_scheduler=param_scheduler,
        torch_dtype=torch_dtype,
        quantization=quantization,
        header=header,
    )
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def run_xtuner(*args, env=None, timeout=600, cwd=None, input=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "xtuner.entry_point", *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=cwd, input=input
    )


def losses_of(work_dir: str) -> list[float]:
    runs = sorted(glob.glob(osp.join(work_dir, "2*", "vis_data", "scalars.json")))
    assert runs, f"no scalars.json under {work_dir}"
    values = []
    with open(runs[-1], encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                values.append(record["loss"])
    return values


def test_version_help_list_and_copy(capsys, tmp_path):
    assert cli(["version"]) == 0
    assert cli(["help"]) == 0
    assert "train" in capsys.readouterr().out
    assert cli(["list-cfg", "-p", "demo"]) == 0
    assert "demo_tiny_llama_full_alpaca" in capsys.readouterr().out
    assert cli(["copy-cfg", "demo_tiny_llama_full_alpaca", str(tmp_path)]) == 0
    assert (tmp_path / "demo_tiny_llama_full_alpaca_copy.py").exists()
    assert cli(["trian"]) == 2
    assert "Did you mean 'train'" in capsys.readouterr().err


def test_upstream_style_config_trains_and_loss_falls(tmp_path, demo_assets):
    cfg = write_config(tmp_path, demo_assets, max_iters=30)
    work_dir = str(tmp_path / "work")
    out = run_xtuner("train", cfg, "--work-dir", work_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "AmpOptimWrapper needs a GPU" in out.stdout + out.stderr
    losses = losses_of(work_dir)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert glob.glob(osp.join(work_dir, "iter_30.pth"))


def test_resume_gives_the_same_loss_curve(tmp_path, demo_assets):
    common = dict(save_steps=3, param_scheduler=CONSTANT_LR, lora="dict(type=LoraConfig, r=8)")
    full_cfg = write_config(tmp_path, demo_assets, name="full.py", max_iters=6, **common)
    full_dir = str(tmp_path / "full")
    out = run_xtuner("train", full_cfg, "--work-dir", full_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    reference = losses_of(full_dir)

    # Stop after 3 iterations, then resume the 6-iteration run from the latest checkpoint.
    part_dir = str(tmp_path / "part")
    short_cfg = write_config(tmp_path, demo_assets, name="short.py", max_iters=3, **common)
    out = run_xtuner("train", short_cfg, "--work-dir", part_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_xtuner("train", full_cfg, "--work-dir", part_dir, "--seed", "0", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = losses_of(part_dir)
    assert resumed == pytest.approx(reference[3:], rel=1e-5)

    # The LoRA checkpoint converts to an HF adapter, which merges into the base model.
    adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "merged")
    out = run_xtuner("convert", "pth_to_hf", full_cfg, osp.join(full_dir, "iter_6.pth"), adapter)
    assert out.returncode == 0, out.stderr[-3000:]
    assert osp.exists(osp.join(adapter, "adapter_config.json"))
    out = run_xtuner("convert", "merge", demo_assets["model"], adapter, merged)
    assert out.returncode == 0, out.stderr[-3000:]
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(demo_assets["model"])
    tuned = AutoModelForCausalLM.from_pretrained(merged)
    ids = torch.arange(5, 25).unsqueeze(0)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits)


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing_config", "neither a file nor a bundled config"),
        ("typo_key", "Did you mean 'llm'"),
        ("missing_model", "does not exist"),
        ("bad_json", "bad.jsonl:2: invalid JSON"),
    ],
)
def test_bad_input_exits_non_zero_with_a_clear_message(tmp_path, demo_assets, case, expect):
    assets = dict(demo_assets)
    if case == "bad_json":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": \n')
        assets["data"] = str(bad)
    if case == "missing_model":
        assets["model"] = str(tmp_path / "no_such_model")
    cfg = write_config(tmp_path, assets, max_iters=2)
    if case == "typo_key":
        path = tmp_path / "cfg.py"
        path.write_text(path.read_text().replace("    llm=dict(", "    llmm=dict(", 1))
    if case == "missing_config":
        cfg = str(tmp_path / "nope.py")
    out = run_xtuner("train", cfg, "--work-dir", str(tmp_path / "w"), env={"HF_HUB_OFFLINE": "1"})
    assert out.returncode != 0
    assert expect in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr


@pytest.mark.multiproc
@pytest.mark.parametrize("deepspeed", [None, "deepspeed_zero2"])
def test_two_processes_with_torchrun(tmp_path, demo_assets, deepspeed):
    cfg = write_config(tmp_path, demo_assets, max_iters=4)
    args = ["train", cfg, "--work-dir", str(tmp_path / "w"), "--seed", "0"]
    if deepspeed:
        args += ["--deepspeed", deepspeed]
    env = {"NPROC_PER_NODE": "2", "PORT": str(random.randint(20000, 29999))}
    out = run_xtuner(*args, env=env)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    assert len(losses_of(str(tmp_path / "w"))) == 4
