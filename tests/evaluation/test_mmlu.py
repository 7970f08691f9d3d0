"""MMLU in an XTuner 0.x config: ``mmlu_collate_fn`` and ``MMLUMetric`` where upstream configs
import them, and a validation loop during ``xtuner train`` reporting per-subject accuracy."""

from __future__ import annotations

import glob
import json
import os.path as osp
import random

import pytest
import torch

from tests.tools.test_train_cli import run_xtuner, write_config
from xtuner.dataset.collate_fns import mmlu_collate_fn

#: the validation part of XTuner 0.2.0's MMLU config (internlm_7b_qlora_oasst1_mmlu_e3), with
#: the data paths of the test; the training data replaces alpaca with the same questions.
VAL_PART = """
from xtuner.dataset.collate_fns import mmlu_collate_fn
from xtuner.dataset.map_fns import default_map_fn
from xtuner.evaluation import MMLUMetric

mmlu_fs_dataset = dict(
    type=load_dataset,
    path='json',
    data_files=dict(val='{val}'))
val_mmlu_fs = dict(
    type=process_hf_dataset,
    dataset=mmlu_fs_dataset,
    tokenizer=tokenizer,
    dataset_map_fn=default_map_fn,
    max_length=max_length,
    input_ids_with_output=False,
    pack_to_max_length=False,
    split='val')
val_dataloader = dict(
    batch_size=4,
    num_workers=0,
    dataset=val_mmlu_fs,
    sampler=dict(type=DefaultSampler, shuffle=False),
    collate_fn=dict(type=mmlu_collate_fn))
val_evaluator = dict(type=MMLUMetric, tokenizer=tokenizer, prefix='mmlu_fs_val')
val_cfg = dict(type='ValLoop')
train_cfg = dict(type=TrainLoop, max_iters=max_iters, val_interval=max_iters)

alpaca_en.update(dataset_map_fn=default_map_fn, template_map_fn=None,
                 pack_to_max_length=False)
train_dataloader.update(batch_size=4)
optim_wrapper["optimizer"].update(lr=5e-3)
"""

SUBJECTS = ("astronomy", "virology")
WORDS = ("planet", "rocket", "market", "garden", "silver", "orange", "window", "bottle")


def write_questions(folder) -> tuple[str, str, list[dict]]:
    """8 questions per subject in an MMLU-like prompt; every astronomy answer is B, every
    virology answer D. The same records (prompt as ``input``, letter as ``output``) are the
    training set, so the tiny model learns to give these answers."""
    rng = random.Random(0)
    records = []
    for subject, letter in zip(SUBJECTS, "BD"):
        for i in range(8):
            options = "\n".join(f"{x}. {rng.choice(WORDS)}" for x in "ABCD")
            # The subject next to the answer: a two-layer model learns it within 40 steps.
            prompt = f"Question {i}: {rng.choice(WORDS)}?\n{options}\n{subject} answer:"
            records.append({"input": prompt, "output": letter, "subject": subject})
    paths = []
    for name in ("train.jsonl", "val.jsonl"):
        path = osp.join(folder, name)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        paths.append(path)
    return paths[0], paths[1], records


def test_mmlu_collate_fn_takes_upstream_records_and_refuses_a_bad_answer():
    instances = [
        {"input_ids": [5, 6, 7], "labels": [-100] * 3, "output": " C", "subject": "virology"},
        {"input_ids": [5, 6], "labels": [-100] * 2, "output": "A", "subject": "astronomy"},
        {"input_ids": [5], "labels": [-100], "output": "D", "subject": "astronomy"},
    ]
    batch = mmlu_collate_fn(instances, pad_index=0)
    assert batch["data"]["input_ids"].tolist() == [[5, 6, 7], [5, 6, 0], [5, 0, 0]]
    assert batch["data"]["attention_mask"].tolist() == [
        [True] * 3,
        [True, True, False],
        [True, False, False],
    ]
    assert batch["data_samples"] == [
        {"length": 3, "answer": 2, "subject": "virology"},
        {"length": 2, "answer": 0, "subject": "astronomy"},
        {"length": 1, "answer": 3, "subject": "astronomy"},
    ]
    assert mmlu_collate_fn(instances, return_hf_format=True).keys() == {
        "input_ids",
        "attention_mask",
    }
    with pytest.raises(ValueError, match="answer letter.*got 'E'"):
        mmlu_collate_fn([{"input_ids": [5], "output": "E", "subject": "x"}])


# About 20 s of CPU: make test-all only (the CI budget of issue 15).
@pytest.mark.slow_all
def test_validation_during_training_reports_per_subject_accuracy(tmp_path, demo_assets):
    train, val, records = write_questions(str(tmp_path))
    assets = dict(demo_assets, data=train)
    cfg = write_config(tmp_path, assets, max_iters=40, save_steps=40, torch_dtype="torch.float32")
    with open(cfg, "a", encoding="utf-8") as f:
        f.write(VAL_PART.format(val=val))
    work_dir = str(tmp_path / "work")
    out = run_xtuner("train", cfg, "--work-dir", work_dir, "--seed", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    logs = sorted(glob.glob(osp.join(work_dir, "2*", "vis_data", "scalars.json")))
    with open(logs[-1], encoding="utf-8") as f:
        metrics = [r for r in map(json.loads, f) if "mmlu_fs_val/accuracy" in r][-1]

    # The naive reference: the trained model's own next-token logits after each prompt, one
    # prompt at a time, the best of the four letters.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from xtuner.tools.utils import load_config

    state = torch.load(osp.join(work_dir, "iter_40.pth"), map_location="cpu", weights_only=False)
    llm = AutoModelForCausalLM.from_pretrained(demo_assets["model"], dtype=torch.float32)
    llm.load_state_dict({k.removeprefix("llm."): v for k, v in state["state_dict"].items()})
    tokenizer = AutoTokenizer.from_pretrained(load_config(cfg).pretrained_model_name_or_path)
    letters = [tokenizer(x, add_special_tokens=False).input_ids[-1] for x in "ABCD"]
    correct = {s: 0 for s in SUBJECTS}
    with torch.no_grad():
        for r in records:
            ids = tokenizer(r["input"], return_tensors="pt").input_ids
            best = "ABCD"[int(llm(ids).logits[0, -1, letters].argmax())]
            correct[r["subject"]] += best == r["output"]
    for subject in SUBJECTS:
        assert metrics[f"mmlu_fs_val/accuracy_{subject}"] == correct[subject] / 8
    assert metrics["mmlu_fs_val/accuracy"] == sum(correct.values()) / 16
    # The model was trained on these answers: it gives them (chance is 1/4).
    assert correct == {"astronomy": 8, "virology": 8}
