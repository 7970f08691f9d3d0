"""Every built-in loss, added as ``loss=dict(type=...)`` to an upstream-style config, trains
through ``xtuner train`` and its loss falls."""

from __future__ import annotations

import glob
import importlib.util
import json
import os.path as osp

import pytest

import xtuner.model.losses  # noqa: F401  (registers the built-ins)
from xtuner.model.losses import PreferenceLoss
from xtuner.registry import LOSSES

_spec = importlib.util.spec_from_file_location(
    "train_cli", osp.join(osp.dirname(osp.abspath(__file__)), "test_train_cli.py")
)
_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cli)
run_xtuner, write_config = _cli.run_xtuner, _cli.write_config


def scalars(work_dir: str, key: str) -> list[float]:
    """One logged scalar per iteration, from mmengine's scalars.json."""
    path = sorted(glob.glob(osp.join(work_dir, "2*", "vis_data", "scalars.json")))[-1]
    with open(path, encoding="utf-8") as f:
        return [r[key] for r in map(json.loads, f) if key in r]


LOSS_CONFIGS = {
    "CrossEntropyLoss": "dict(type='CrossEntropyLoss', label_smoothing=0.05)",
    "FocalLoss": "dict(type='FocalLoss', gamma=2.0)",
    "DFTLoss": "dict(type='DFTLoss')",
    "ZLoss": "[dict(type='CrossEntropyLoss'), dict(type='ZLoss', loss_weight=1e-3)]",
    "EntropyRegularization": (
        "[dict(type='CrossEntropyLoss'), dict(type='EntropyRegularization', loss_weight=0.01)]"
    ),
    "SampleWeightedCELoss": "dict(type='SampleWeightedCELoss')",
    "TokenWeightedCELoss": "dict(type='TokenWeightedCELoss')",
    "KDLoss": (
        "dict(type='KDLoss', teacher=dict(type=AutoModelForCausalLM.from_pretrained, "
        "pretrained_model_name_or_path=pretrained_model_name_or_path), ce_weight=0.5)"
    ),
    # MoE router terms: trained on a tiny Mixtral (see moe_model).
    "RouterAuxLoss": (
        "[dict(type='CrossEntropyLoss'), dict(type='RouterAuxLoss', coef=0.02), "
        "dict(type='RouterZLoss', coef=1e-3)]"
    ),
    "RouterZLoss": "[dict(type='CrossEntropyLoss'), dict(type='RouterZLoss', coef=1e-3)]",
}
MOE_TERMS = {"RouterAuxLoss": "loss_router_aux", "RouterZLoss": "loss_router_z"}
# The RouterAuxLoss run trains both router terms; RouterZLoss alone only in make test-all.
PARAMS = [
    pytest.param(name, marks=pytest.mark.slow_all) if name == "RouterZLoss" else name
    for name in sorted(LOSS_CONFIGS)
]


def test_every_built_in_loss_is_covered():
    # Preference losses train on preference data: tests/tools/test_train_preference.py.
    built_in = {
        name
        for name, cls in LOSSES.module_dict.items()
        if cls.__module__.startswith("xtuner.model.losses")
        and name != "CompositeLoss"
        and not issubclass(cls, PreferenceLoss)
    }
    assert built_in == set(LOSS_CONFIGS)


@pytest.fixture(scope="module")
def weighted_data(tmp_path_factory, demo_assets) -> str:
    """The demo data with a per-record loss weight (for TokenWeightedCELoss)."""
    path = tmp_path_factory.mktemp("weighted") / "data.jsonl"
    with open(demo_assets["data"], encoding="utf-8") as src, open(path, "w") as dst:
        for i, line in enumerate(src):
            record = json.loads(line)
            record["loss_weight"] = 2.0 if i % 3 == 0 else 1.0
            dst.write(json.dumps(record) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory, demo_assets) -> str:
    """A tiny random Mixtral with the demo tokenizer, saved like a downloaded model."""
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    path = str(tmp_path_factory.mktemp("tiny_mixtral"))
    tokenizer = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", PARAMS)
def test_loss_trains_through_xtuner_train(tmp_path, demo_assets, weighted_data, name, request):
    assets = dict(demo_assets)
    if name == "TokenWeightedCELoss":
        assets["data"] = weighted_data
    if name in MOE_TERMS:
        assets["model"] = request.getfixturevalue("moe_model")
    cfg = write_config(tmp_path, assets, max_iters=25, loss=f",\n    loss={LOSS_CONFIGS[name]}")
    work_dir = str(tmp_path / "work")
    out = run_xtuner("train", cfg, "--work-dir", work_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    # DFT's value, p * -log p, grows while p is below 1/e: its progress shows in accuracy.
    key = "acc" if name == "DFTLoss" else "loss"
    values = scalars(work_dir, key)
    terms = (
        ["loss_router_aux", "loss_router_z"] if name == "RouterAuxLoss" else [MOE_TERMS.get(name)]
    )
    for term in filter(None, terms):
        router = scalars(work_dir, term)
        assert len(router) == 25 and all(v > 0 for v in router), (term, router)
    assert len(values) == 25
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    if key == "acc":
        assert last > 1.5 * first, (name, values)
    else:
        assert last < 0.85 * first, (name, values)
