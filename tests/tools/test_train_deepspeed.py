"""``--deepspeed``: the DeepSpeed config follows the training config (docs/en/distributed.md).

The unit tests build the DeepSpeed config of every precision case of the table in the docs.
The multi-process tests train an upstream-style config with 2 ranks of ZeRO-1/2/3 and compare
with one process on the same global batch: logged losses, final weights, the HF export and
``pth_to_hf`` of the checkpoint folder.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import os.path as osp
import random
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.logging import MMLogger

from xtuner.tools.train import DEEPSPEED_DIR, deepspeed_config
from xtuner.tools.utils import UserError

HERE = osp.dirname(osp.abspath(__file__))


def _cfg(wrapper="AmpOptimWrapper", dtype=None, max_norm=1.0, accumulate=3, batch=2) -> Config:
    optim = dict(
        type=wrapper, optimizer=dict(type="AdamW", lr=1e-3), accumulative_counts=accumulate
    )
    if dtype is not None:
        optim["dtype"] = dtype
    if max_norm is not None:
        optim["clip_grad"] = dict(max_norm=max_norm, error_if_nonfinite=False)
    return Config(dict(optim_wrapper=optim, train_dataloader=dict(batch_size=batch)))


def _json(tmp_path, **overrides) -> str:
    with open(osp.join(DEEPSPEED_DIR, "deepspeed_zero2.json"), encoding="utf-8") as f:
        ds = json.load(f)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key].update(value)
        else:
            ds[key] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


def _precision(ds: dict) -> str:
    on = [k for k in ("fp16", "bf16") if ds[k]["enabled"]]
    assert len(on) <= 1, ds
    return on[0] if on else "fp32"


@pytest.mark.parametrize(
    "wrapper, dtype, bf16_supported, expect",
    [
        ("OptimWrapper", None, True, "fp32"),
        ("AmpOptimWrapper", "bfloat16", False, "bf16"),
        ("AmpOptimWrapper", "bfloat16", True, "bf16"),
        # upstream configs say float16: "auto" picks bf16 where the GPU has it, as upstream
        ("AmpOptimWrapper", "float16", True, "bf16"),
        ("AmpOptimWrapper", "float16", False, "fp16"),
        ("AmpOptimWrapper", None, True, "bf16"),
        ("AmpOptimWrapper", None, False, "fp16"),
    ],
)
def test_precision_follows_the_config(wrapper, dtype, bf16_supported, expect):
    for preset in ("deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"):
        ds = deepspeed_config(preset, _cfg(wrapper, dtype), bf16_supported=bf16_supported)
        assert _precision(ds) == expect


def test_options_come_from_the_config():
    ds = deepspeed_config("deepspeed_zero3", _cfg(max_norm=0.5, accumulate=4, batch=3))
    assert ds["gradient_clipping"] == 0.5
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert "train_batch_size" not in ds
    assert deepspeed_config("deepspeed_zero1", _cfg(max_norm=None))["gradient_clipping"] == 0.0


@pytest.fixture
def warnings_logged():
    logger = MMLogger.get_current_instance()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_explicit_json_values_are_kept_or_overridden_with_a_warning(tmp_path, warnings_logged):
    path = _json(
        tmp_path,
        fp16={"enabled": True},
        gradient_clipping=5.0,
        gradient_accumulation_steps=8,
        train_batch_size=64,
    )
    ds = deepspeed_config(path, _cfg("AmpOptimWrapper", "bfloat16"), bf16_supported=True)
    assert _precision(ds) == "fp16"  # an explicit precision in the JSON wins
    assert ds["gradient_clipping"] == 1.0 and ds["gradient_accumulation_steps"] == 3
    (message,) = [m for m in warnings_logged if "DeepSpeed config" in m]
    assert "kept from the JSON: fp16.enabled=True (the config gives bf16)" in message
    assert "gradient_clipping=5.0 -> 1.0" in message
    assert "gradient_accumulation_steps=8 -> 3" in message
    assert "train_batch_size=64" in message


def test_explicitly_disabled_precision_trains_in_fp32(tmp_path):
    path = _json(tmp_path, bf16={"enabled": False})
    ds = deepspeed_config(path, _cfg("AmpOptimWrapper", "bfloat16"), bf16_supported=True)
    assert _precision(ds) == "fp32"


@pytest.mark.parametrize(
    "overrides, cfg, expect",
    [
        (
            dict(fp16={"enabled": True}, bf16={"enabled": True}),
            _cfg(),
            "enables both fp16 and bf16",
        ),
        ({}, _cfg(dtype="int8"), "optim_wrapper.dtype='int8'"),
        ({}, None, "clip_grad.type='value'"),
    ],
)
def test_bad_settings_are_named(tmp_path, overrides, cfg, expect):
    if cfg is None:
        cfg = _cfg()
        cfg.optim_wrapper.clip_grad = dict(type="value", clip_value=1.0)
    with pytest.raises(UserError, match=re.escape(expect)):
        deepspeed_config(_json(tmp_path, **overrides), cfg, bf16_supported=True)


def test_unknown_preset_and_bad_json_are_named(tmp_path):
    with pytest.raises(UserError, match="neither a JSON file nor a bundled preset"):
        deepspeed_config("deepspeed_zero4", _cfg())
    bad = tmp_path / "bad.json"
    bad.write_text('{"fp16": }')
    with pytest.raises(UserError, match="bad.json: invalid JSON at line 1"):
        deepspeed_config(str(bad), _cfg())


# Two ranks of ZeRO-1/2/3 against one process --------------------------------------------
_spec = importlib.util.spec_from_file_location("train_cli", osp.join(HERE, "test_train_cli.py"))
_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cli)
run_xtuner, write_config, losses_of = _cli.run_xtuner, _cli.write_config, _cli.losses_of

LORA = "dict(type=LoraConfig, r=8, lora_alpha=16)"
ITERS = 10
PROBE_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))}
#: appended to the upstream-style config: the HF export at the end, the probe of the loading
#: (tests/tools/zero_init_probe.py, importable through PYTHONPATH).
EXTRA = """
from zero_init_probe import from_pretrained_measured
from xtuner.engine.hooks import HFCheckpointHook
custom_hooks += [dict(type=HFCheckpointHook)]
model['llm']['type'] = from_pretrained_measured
model['llm']['probe_dir'] = {probe!r}
"""


def _config(tmp_path, assets, lora: str, name: str) -> str:
    path = write_config(
        tmp_path, assets, name=f"{name}.py", max_iters=ITERS, save_steps=ITERS, lora=lora
    )
    with open(path, "a", encoding="utf-8") as f:
        f.write(EXTRA.format(probe=str(tmp_path / f"probe_{name}")))
    return path


def _zero_json(tmp_path, stage: int) -> str:
    """The bundled preset, with every parameter partitioned (the tiny model's are all below
    the preset's persistence threshold, which would keep them whole)."""
    with open(osp.join(DEEPSPEED_DIR, f"deepspeed_zero{stage}.json"), encoding="utf-8") as f:
        ds = json.load(f)
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps(ds))
    return str(path)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, demo_assets):
    """Single-process runs (full and LoRA) on the global batch of 2 ranks x 2 samples."""
    runs = {}

    def run(lora: str) -> dict:
        if lora not in runs:
            tmp = tmp_path_factory.mktemp("one_process")
            cfg = _config(tmp, demo_assets, lora, "one")
            work = str(tmp / "work")
            out = run_xtuner(
                "train", cfg, "--work-dir", work, "--seed", "0",
                "--cfg-options", "train_dataloader.batch_size=4", env=PROBE_ENV,
            )  # fmt: skip
            assert out.returncode == 0, out.stderr[-3000:]
            runs[lora] = dict(cfg=cfg, work=work, losses=losses_of(work))
        return runs[lora]

    return run


def _assert_same_tensors(ref: dict, got: dict, rtol: float = 1e-5) -> None:
    assert sorted(ref) == sorted(got)
    for key in ref:
        scale = float(ref[key].abs().max())
        torch.testing.assert_close(
            got[key], ref[key], rtol=rtol, atol=rtol * scale, msg=lambda m, k=key: f"{k}: {m}"
        )


def _hf_weights(path: str, lora: bool) -> dict:
    """The exported model loaded back with from_pretrained (the adapter alone for LoRA)."""
    if lora:
        from peft import PeftConfig, PeftModel, get_peft_model_state_dict
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(
            PeftConfig.from_pretrained(path).base_model_name_or_path
        )
        return dict(get_peft_model_state_dict(PeftModel.from_pretrained(base, path)))
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(path).state_dict())


def _check_two_ranks(tmp_path, demo_assets, one_process, stage: int, lora: str) -> None:
    ref = one_process(lora)
    cfg = _config(tmp_path, demo_assets, lora, f"zero{stage}")
    work = str(tmp_path / "work")
    env = {"NPROC_PER_NODE": "2", "PORT": str(random.randint(20000, 29999)), **PROBE_ENV}
    args = ["train", cfg, "--work-dir", work, "--seed", "0"]
    out = run_xtuner(*args, "--deepspeed", _zero_json(tmp_path, stage), env=env)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])

    # The logged losses (of the global batch) and the final weights are one process's.
    assert losses_of(work)[:ITERS] == pytest.approx(ref["losses"][:ITERS], rel=1e-5)
    is_lora = lora != "None"
    expected = _hf_weights(osp.join(ref["work"], "hf_model"), is_lora)
    _assert_same_tensors(expected, _hf_weights(osp.join(work, "hf_model"), is_lora))

    if stage == 3:  # loaded under zero.Init: no rank ever held the whole model
        for rank in (0, 1):
            with open(tmp_path / f"probe_zero{stage}" / f"rank{rank}.json") as f:
                probe = json.load(f)
            assert probe["local"] <= probe["full"] / 2 + 1024, probe
            # its partitions plus the one module being filled (here the 1024 x 64 embedding,
            # a third of this tiny model) stay below the whole model
            assert probe["local"] + probe["gathered_at_once"] < probe["full"], probe

    # The checkpoint folder converts to the same model, and holds no frozen weight.
    folder = osp.join(work, f"iter_{ITERS}.pth")
    from xtuner.model.utils import load_checkpoint_state

    saved = load_checkpoint_state(folder)
    if is_lora:
        assert saved and all("lora_" in k for k in saved), sorted(saved)[:5]
    converted = str(tmp_path / "converted")
    out = run_xtuner("convert", "pth_to_hf", cfg, folder, converted, "--fp32", env=PROBE_ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    _assert_same_tensors(expected, _hf_weights(converted, is_lora))


@pytest.mark.multiproc
@pytest.mark.slow
def test_zero3_two_ranks_equal_one_process(tmp_path, demo_assets, one_process):
    _check_two_ranks(tmp_path, demo_assets, one_process, 3, "None")


@pytest.mark.multiproc
@pytest.mark.slow_all
@pytest.mark.parametrize(
    "stage, lora",
    [
        (1, "None"),
        (2, "None"),
        (2, LORA),
        (3, LORA),
    ],
    ids=["z1", "z2", "z2-lora", "z3-lora"],
)
def test_zero_two_ranks_equal_one_process(tmp_path, demo_assets, one_process, stage, lora):
    _check_two_ranks(tmp_path, demo_assets, one_process, stage, lora)
