"""XTuner 0.2.0's training configs against this fork, from the pinned manifest of their shapes.

``xtuner_0_2_0_configs.json`` (written by ``tools/upstream_config_manifest.py`` from the
upstream repository at v0.2.0) lists the 587 training configs (584 mmengine ones, 3 for the
HF Trainer) and, per distinct shape, the ``(module, name)`` pairs they import and the
``type=`` values they use. For every config: every imported name must resolve here (import
the module, get the name), and a config of its shape -- the same imports and one
``dict(type=...)`` per ``type=`` value -- must load through ``xtuner``'s ``load_config``
(mmengine's lazy-import mode, as a real config) with every ``type=`` resolving to an object.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os.path as osp
from functools import cache
from pathlib import Path

import pytest
from mmengine import registry as mmengine_registry
from mmengine.config.lazy import LazyObject

from xtuner import registry as xtuner_registry
from xtuner.tools.utils import load_config

MANIFEST = osp.join(osp.dirname(osp.abspath(__file__)), "xtuner_0_2_0_configs.json")

#: optional model/data hubs: a config importing one runs only where it is installed
#: (``pip install 'xtuner[modelscope]'``; openMind supports Python 3.8-3.10 only, see
#: docs/en/compatibility.md).
OPTIONAL_HUBS = {"modelscope", "openmind", "openmind_hub"}


def manifest() -> dict:
    with open(MANIFEST, encoding="utf-8") as f:
        return json.load(f)


def hub_missing(module: str) -> bool:
    top = module.split(":")[0].split(".")[0]
    return top in OPTIONAL_HUBS and importlib.util.find_spec(top) is None


@cache
def resolve(entry: str) -> str | None:
    """None when ``module:name`` (or ``module``) imports; else why it does not."""
    module, _, name = entry.partition(":")
    try:
        imported = importlib.import_module(module)
        if name:
            getattr(imported, name)
    except (ImportError, AttributeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def registered(name: str) -> bool:
    """A quoted ``type=`` value: registered in one of mmengine's or xtuner's registries."""
    registries = [
        value
        for module in (mmengine_registry, xtuner_registry)
        for value in vars(module).values()
        if isinstance(value, mmengine_registry.Registry)
    ]
    return any(reg.get(name) is not None for reg in registries)


def synthetic_config(shape: dict) -> str:
    """A config of the shape: its imports and one ``dict(type=...)`` per ``type=`` value."""
    lines = []
    for entry in shape["imports"]:
        module, _, name = entry.partition(":")
        lines.append(f"from {module} import {name}" if name else f"import {module}")
    if shape["framework"] != "mmengine":
        lines.append(f"framework = {shape['framework']!r}")
    lines += [f"part{i} = dict(type={value})" for i, value in enumerate(shape["types"])]
    return "\n".join(lines) + "\n"


def shape_failures(shape_id: str, shape: dict, folder: str) -> list[str]:
    """What fails for a shape: unresolved imports, a config that does not load, a bad type."""
    failures = [f"{e}: {why}" for e in shape["imports"] if (why := resolve(e)) is not None]
    if failures:
        return failures  # the synthetic config would fail on the same names
    path = osp.join(folder, f"{shape_id}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(synthetic_config(shape))
    cfg = load_config(path)
    for i, value in enumerate(shape["types"]):
        # The config holds a lazy object; mmengine's ConfigDict imports it on access.
        if not isinstance(cfg._cfg_dict[f"part{i}"].to_dict()["type"], (LazyObject, str)):
            failures.append(f"type={value}: not parsed lazily")
        try:
            given = cfg[f"part{i}"]["type"]
        except (ImportError, AttributeError) as exc:
            failures.append(f"type={value}: {type(exc).__name__}: {exc}")
            continue
        if isinstance(given, str) and not registered(given):
            failures.append(f"type={value}: not in any mmengine or xtuner registry")
        elif not isinstance(given, str) and not callable(given):
            failures.append(f"type={value}: resolves to {given!r}, which is not callable")
    return failures


def allowed(shape: dict) -> set[str]:
    """Why a shape may fail here: an optional hub that is not installed."""
    why = set()
    for entry in shape["imports"]:
        if hub_missing(entry):
            why.add(f"optional hub {entry.split('.')[0].split(':')[0]} is not installed")
    return why


def test_the_manifest_holds_the_584_mmengine_configs_and_3_hf_trainer_ones():
    data = manifest()
    configs, shapes = data["configs"], data["shapes"]
    assert data["ref"] == "v0.2.0"
    frameworks = [shapes[s]["framework"] for s in configs.values()]
    assert frameworks.count("mmengine") == 584
    assert frameworks.count("huggingface") == 3
    assert set(configs.values()) == set(shapes)
    # Every mmengine config trains through TrainLoop; the HF ones through the HF Trainer.
    for path, shape_id in configs.items():
        hf = shapes[shape_id]["framework"] == "huggingface"
        assert ("xtuner.engine.runner:TrainLoop" in shapes[shape_id]["imports"]) != hf, path


def test_every_upstream_config_resolves_and_parses(tmp_path):
    data = manifest()
    by_shape = {
        sid: shape_failures(sid, shape, str(tmp_path)) for sid, shape in data["shapes"].items()
    }
    unexpected, passed_but_allowed = {}, []
    for path, sid in data["configs"].items():
        shape = data["shapes"][sid]
        failures, excuses = by_shape[sid], allowed(shape)
        if failures and not excuses:
            unexpected[path] = failures
        elif failures:
            # Only the missing hub may fail: it must not hide another break.
            other = [f for f in failures if not hub_missing(f)]
            if other:
                unexpected[path] = other
        elif any("optional hub" in e for e in excuses):
            passed_but_allowed.append(path)
    assert not unexpected, json.dumps(unexpected, indent=1)[:4000]
    assert not passed_but_allowed, f"these import a missing hub but passed: {passed_but_allowed}"


def test_exactly_the_hub_configs_are_excused():
    data = manifest()
    excused = {
        path: allowed(data["shapes"][sid])
        for path, sid in data["configs"].items()
        if allowed(data["shapes"][sid])
    }
    hubs = {p for p, why in excused.items() if any("optional hub" in w for w in why)}
    expected_hubs = 0
    if hub_missing("modelscope"):
        expected_hubs += 5  # the msagent ReAct configs (process_ms_dataset + MsDataset.load)
    if hub_missing("openmind"):
        expected_hubs += 1  # qwen1_5_4b_qlora_alpaca_e3_openmind (OmDataset, openmind_hub)
    assert len(hubs) == expected_hubs, sorted(hubs)
    assert len(excused) == len(hubs), sorted(set(excused) - hubs)


@pytest.mark.parametrize(
    "entry",
    [
        "xtuner.dataset.collate_fns:mmlu_collate_fn",
        "xtuner.evaluation:MMLUMetric",
        "xtuner.model.transformers_models.deepseek_v2:DeepseekV2ForCausalLM",
        "xtuner.dataset:process_ms_dataset",
    ],
)
def test_the_names_this_branch_adds_resolve(entry):
    assert resolve(entry) is None


@pytest.mark.skipif(not hub_missing("openmind"), reason="openMind is installed")
def test_a_config_of_a_missing_hub_says_what_to_install(tmp_path, demo_assets, capsys):
    """The openMind config's data loader (``OmDataset.load_dataset``) without openMind."""
    from tests.tools.test_train_cli import write_config
    from xtuner.entry_point import cli

    cfg = write_config(tmp_path, demo_assets, max_iters=1, header="from openmind import OmDataset")
    path = Path(cfg)
    path.write_text(
        path.read_text(encoding="utf-8").replace(
            "dataset=dict(type=load_dataset, path='json', data_files=dict(train=alpaca_en_path))",
            "dataset=dict(type=OmDataset.load_dataset, path=alpaca_en_path)",
        ),
        encoding="utf-8",
    )
    assert cli(["train", cfg, "--work-dir", str(tmp_path / "work")]) == 1
    err = capsys.readouterr().err
    assert "The config needs 'openmind', which is not installed" in err
    assert "Python 3.8-3.10 only" in err
