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
}


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


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOSS_CONFIGS))
def test_loss_trains_through_xtuner_train(tmp_path, demo_assets, weighted_data, name):
    assets = dict(demo_assets)
    if name == "TokenWeightedCELoss":
        assets["data"] = weighted_data
    cfg = write_config(tmp_path, assets, max_iters=25, loss=f",\n    loss={LOSS_CONFIGS[name]}")
    work_dir = str(tmp_path / "work")
    out = run_xtuner("train", cfg, "--work-dir", work_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    # DFT's value, p * -log p, grows while p is below 1/e: its progress shows in accuracy.
    key = "acc" if name == "DFTLoss" else "loss"
    values = scalars(work_dir, key)
    assert len(values) == 25
    first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
    if key == "acc":
        assert last > 1.5 * first, (name, values)
    else:
        assert last < 0.85 * first, (name, values)
