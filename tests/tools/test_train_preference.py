"""Upstream-style DPO, ORPO and reward-model configs train through `xtuner train`.

The preference file is written here: every prompt asks about a word; the chosen answer
affirms it, the rejected one is a short refusal, so the preference is learnable in a few
dozen steps of a tiny random model.
"""

from __future__ import annotations

import ast
import glob
import importlib
import importlib.util
import json
import os.path as osp

import pytest
import torch

from xtuner.entry_point import cli
from xtuner.tools import check_loss

_spec = importlib.util.spec_from_file_location(
    "train_cli", osp.join(osp.dirname(osp.abspath(__file__)), "test_train_cli.py")
)
_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cli)
losses_of, run_xtuner = _cli.losses_of, _cli.run_xtuner

HERE = osp.dirname(osp.abspath(__file__))
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "paper",
    "music",
    "garden",
]

MODELS = {
    "dpo": (
        "dict(\n    type=DPO,\n    use_varlen_attn=use_varlen_attn,\n    loss_type=dpo_loss_type,\n"
        "    beta=loss_beta,\n    label_smoothing=label_smoothing,{dpo_extra}\n    llm=dict(\n"
        "        type=AutoModelForCausalLM.from_pretrained,\n"
        "        pretrained_model_name_or_path=pretrained_model_name_or_path,\n"
        "        trust_remote_code=True,\n        torch_dtype=torch.float32))"
    ),
    "orpo": (
        "dict(\n    type=ORPO,\n    use_varlen_attn=use_varlen_attn,\n    beta=loss_beta,\n"
        "    llm=dict(\n        type=AutoModelForCausalLM.from_pretrained,\n"
        "        pretrained_model_name_or_path=pretrained_model_name_or_path,\n"
        "        trust_remote_code=True,\n        torch_dtype=torch.float32))"
    ),
    "reward": (
        "dict(\n    type=RewardModel,\n    use_varlen_attn=use_varlen_attn,\n"
        "    loss_type=loss_type,\n    penalty_type=penalty_type,\n    llm=dict(\n"
        "        type=AutoModelForCausalLM.from_pretrained,\n"
        "        pretrained_model_name_or_path=pretrained_model_name_or_path,\n"
        "        trust_remote_code=True,\n        torch_dtype=torch.float32))"
    ),
}
CHAT_HOOKS = (
    "[\n    dict(type=DatasetInfoHook, tokenizer=tokenizer),\n    dict(\n"
    "        type=EvaluateChatHook,\n        tokenizer=tokenizer,\n"
    "        every_n_iters=evaluation_freq,\n        evaluation_inputs=evaluation_inputs,\n"
    "        system=SYSTEM,\n        prompt_template=prompt_template,\n"
    "        max_new_tokens=4)\n]"
)


# The reference's log-probabilities computed once before training (registered hook name).
PRECOMPUTE = " + [dict(type='PrecomputeRefLogpsHook')]"


def write_pairs(path, n=40, seed=0) -> str:
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            word = rng.choice(WORDS)
            record = {
                "prompt": [{"role": "user", "content": f"Tell me about the {word} number {i}."}],
                "chosen": [{"role": "assistant", "content": f"The {word} is lovely and bright."}],
                "rejected": [{"role": "assistant", "content": "No."}],
            }
            f.write(json.dumps(record) + "\n")
    return str(path)


def write_preference_config(
    tmp_path,
    model_path,
    data_path,
    kind,
    *,
    max_iters=20,
    varlen=True,
    batch_size=1,
    accumulative_counts=1,
    lr="2e-4",
    dpo_loss_type="sigmoid",
    precompute=False,
) -> str:
    with open(osp.join(HERE, "preference_config.py.tmpl"), encoding="utf-8") as f:
        text = f.read()
    text = text.format(
        model_path=model_path,
        data_path=data_path,
        use_varlen_attn=varlen,
        dpo_loss_type=dpo_loss_type,
        batch_size=batch_size,
        accumulative_counts=accumulative_counts,
        max_iters=max_iters,
        lr=lr,
        model=MODELS[kind].replace(
            "{dpo_extra}", "\n    precompute_ref_log_probs=True," if precompute else ""
        ),
        map_fn="None",
        is_dpo=kind != "reward",
        is_reward=kind == "reward",
        custom_hooks="[]" if kind == "reward" else CHAT_HOOKS + (PRECOMPUTE if precompute else ""),
    )
    path = tmp_path / f"{kind}.py"
    path.write_text(text)
    return str(path)


def scalars(work_dir: str, key: str) -> list[float]:
    runs = sorted(glob.glob(osp.join(work_dir, "2*", "vis_data", "scalars.json")))
    assert runs, f"no scalars.json under {work_dir}"
    with open(runs[-1], encoding="utf-8") as f:
        return [r[key] for r in map(json.loads, f) if key in r]


def mean(values):
    return sum(values) / len(values)


@pytest.mark.slow
def test_dpo_config_trains_and_reward_accuracy_rises(tmp_path, chat_model_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg = write_preference_config(
        tmp_path, chat_model_path, data, "dpo", max_iters=24, precompute=True
    )
    work, cache = str(tmp_path / "work"), str(tmp_path / "cache")
    out = run_xtuner(
        "train", cfg, "--work-dir", work, "--seed", "0", env={"XTUNER_DATASET_CACHE": cache}
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # The reference ran once over the 40 pairs before training, then was released.
    assert "reference log-probabilities of 80 sequences" in out.stdout + out.stderr
    assert glob.glob(osp.join(cache, "reference_logps", "*.pt"))
    losses, acc = losses_of(work), scalars(work, "reward_acc")
    assert len(losses) == len(acc) == 24
    assert mean(acc[-6:]) > 0.8 and mean(acc[:3]) < 0.8
    assert mean(losses[-6:]) < mean(losses[:3]) < 0.7  # starts at log 2 = 0.693
    for key in ("reward_margin", "chosen_rewards", "rejected_rewards", "chosen_logps"):
        assert len(scalars(work, key)) == 24, key
    assert glob.glob(osp.join(work, "iter_24.pth"))


@pytest.mark.slow
def test_orpo_config_trains_with_its_two_terms(tmp_path, chat_model_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg = write_preference_config(
        tmp_path, chat_model_path, data, "orpo", max_iters=12, varlen=False, batch_size=2, lr="1e-3"
    )
    work = str(tmp_path / "work")
    out = run_xtuner("train", cfg, "--work-dir", work, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    losses, nll, odds = losses_of(work), scalars(work, "loss_nll"), scalars(work, "loss_or")
    assert len(losses) == 12
    # The logged total is the sum of the two terms, nothing else (no metric inflates it).
    assert losses == pytest.approx([a + b for a, b in zip(nll, odds)], rel=1e-4)
    assert mean(losses[-3:]) < 0.95 * mean(losses[:3])


@pytest.mark.slow
def test_reward_model_config_trains_and_exports_a_classifier(tmp_path, chat_model_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    cfg = write_preference_config(
        tmp_path, chat_model_path, data, "reward", max_iters=20, lr="1e-3"
    )
    work = str(tmp_path / "work")
    out = run_xtuner("train", cfg, "--work-dir", work, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    acc = scalars(work, "reward_acc")
    assert len(acc) == 20 and mean(acc[-5:]) > 0.8
    save = str(tmp_path / "hf")
    # In this process (xtuner's own entry point) to save a start-up.
    assert cli(["convert", "pth_to_hf", cfg, osp.join(work, "iter_20.pth"), save, "--fp32"]) == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    classifier = AutoModelForSequenceClassification.from_pretrained(save)
    tokenizer = AutoTokenizer.from_pretrained(save)
    prompt = [{"role": "user", "content": "Tell me about the apple number 3."}]
    scores = []
    for answer in ("The apple is lovely and bright.", "No."):
        text = tokenizer.apply_chat_template(
            prompt + [{"role": "assistant", "content": answer}], tokenize=False
        )
        ids = tokenizer.encode(text, add_special_tokens=False) + [0]  # the reward token
        with torch.no_grad():
            scores.append(classifier(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert scores[0] > scores[1]


def test_check_loss_runs_on_a_dpo_config(tmp_path, chat_model_path):
    data = write_pairs(tmp_path / "pairs.jsonl", n=8)
    cfg = write_preference_config(
        tmp_path, chat_model_path, data, "dpo", varlen=False, batch_size=2
    )
    out_dir = tmp_path / "check"
    code = check_loss.main([cfg, "--batches", "1", "--steps", "2", "--out", str(out_dir)])
    with open(out_dir / "report.json", encoding="utf-8") as f:
        report = json.load(f)
    assert code == 0, report["reason"]
    checks = {c["name"]: c["status"] for c in report["checks"]}
    assert checks["gradcheck (float64, loss alone)"] == "PASS"
    assert report["loss"] == "DPOLoss"


# Module-level imports of upstream XTuner's 17 current configs under xtuner/configs/{dpo,orpo,
# reward_model} (and the 3 older top-level copies, same imports): 20 configs.
UPSTREAM_CONFIG_IMPORTS = """
import torch
from datasets import load_dataset
from mmengine.dataset import DefaultSampler
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from mmengine.visualization import TensorboardVisBackend, Visualizer
from peft import LoraConfig
from torch.optim import AdamW
from transformers import (AutoModel, AutoModelForCausalLM, AutoTokenizer,
                          BitsAndBytesConfig)

from xtuner.dataset.collate_fns.preference_collate_fn import \\
    preference_collate_fn
from xtuner.dataset.preference_dataset import (build_preference_dataset,
                                               load_jsonl_dataset,
                                               orpo_dpo_mix_40k_map_fn)
from xtuner.engine.hooks import (DatasetInfoHook, EvaluateChatHook,
                                 VarlenAttnArgsToMessageHubHook)
from xtuner.engine.runner import TrainLoop
from xtuner.model.dpo import DPO
from xtuner.model.orpo import ORPO
from xtuner.model.reward import RewardModel
from xtuner.parallel.sequence import SequenceParallelSampler
from xtuner.utils import PROMPT_TEMPLATE, SYSTEM_TEMPLATE
"""


def test_upstream_preference_config_imports_resolve():
    tree = ast.parse(UPSTREAM_CONFIG_IMPORTS)
    count = 0
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
                count += 1
        else:
            importlib.import_module(node.names[0].name)
    assert count == 32
    from xtuner.dataset.preference_dataset import intel_orca_dpo_map_fn

    assert callable(intel_orca_dpo_map_fn)
