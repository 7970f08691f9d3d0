"""Lazy package exports: the names configs import still resolve (to the defining module's own
objects), and importing a package or a light sibling module no longer drags in the heavy
libraries."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

LAZY_PACKAGES = ["xtuner.model", "xtuner.dataset", "xtuner.engine", "xtuner.utils"]
# The names XTuner 0.x configs import (COMPAT.md, section 1) that this fork provides.
CONFIG_NAMES = {
    "xtuner.dataset": ["process_hf_dataset", "ConcatDataset", "LLaVADataset", "process_ms_dataset"],
    "xtuner.dataset.collate_fns": ["default_collate_fn"],
    "xtuner.dataset.map_fns": ["template_map_fn_factory", "alpaca_map_fn", "openai_map_fn"],
    "xtuner.dataset.samplers": ["LengthGroupedSampler", "InternRepoSampler"],
    "xtuner.engine": ["DatasetInfoHook", "EvaluateChatHook", "TrainLoop"],
    "xtuner.engine.hooks": [
        "DatasetInfoHook",
        "EvaluateChatHook",
        "VarlenAttnArgsToMessageHubHook",
        "ThroughputHook",
        "HFCheckpointHook",
    ],
    "xtuner.engine.runner": ["TrainLoop"],
    "xtuner.model": ["SupervisedFinetune", "LLaVAModel"],
    "xtuner.parallel.sequence": ["SequenceParallelSampler"],
    "xtuner.utils": ["PROMPT_TEMPLATE", "SYSTEM_TEMPLATE", "IGNORE_INDEX", "IMAGE_TOKEN_INDEX"],
    "xtuner.registry": ["BUILDER", "MAP_FUNC", "LOSSES"],
}


@pytest.mark.parametrize("module", sorted(CONFIG_NAMES))
def test_config_names_import(module):
    for name in CONFIG_NAMES[module]:
        exec(f"from {module} import {name}", {})


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_each_export_is_the_defining_modules_object(package):
    pkg = importlib.import_module(package)
    assert pkg.__all__, package
    for name in pkg.__all__:
        value = getattr(pkg, name)
        defining = getattr(value, "__module__", None)
        if defining is not None and defining.startswith(package):
            assert getattr(importlib.import_module(defining), name) is value
        assert name in dir(pkg)


def test_unknown_names_fail_like_a_normal_module():
    import xtuner.model

    with pytest.raises(AttributeError, match="'xtuner.model' has no attribute 'NoSuchModel'"):
        xtuner.model.NoSuchModel  # noqa: B018
    with pytest.raises(ImportError, match="NoSuchModel"):
        exec("from xtuner.model import NoSuchModel", {})


@pytest.mark.parametrize(
    "statement, absent",
    [
        ("import xtuner", ["torch", "mmengine"]),
        ("import xtuner.utils.constants", ["torch", "mmengine"]),
        ("import xtuner.dataset.map_fns", ["torch", "datasets", "transformers"]),
        ("import xtuner.tools.utils", ["torch", "mmengine"]),
        ("from xtuner.utils import PROMPT_TEMPLATE", ["torch", "transformers"]),
    ],
)
def test_light_imports_stay_light(statement, absent):
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & set(absent), f"{statement!r} imported {sorted(loaded & set(absent))}"
