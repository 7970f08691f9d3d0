"""`xtuner test CONFIG --checkpoint PTH`: the config's test loop and MMLU-style accuracy."""

from __future__ import annotations

import json

import torch
from mmengine.config import Config

from tests.tools.test_train_cli import run_xtuner, write_config
from xtuner.entry_point import cli
from xtuner.registry import BUILDER

TEST_PART = """
from mmengine.runner import TestLoop
from xtuner.evaluation import MMLUDataset, MMLUMetric, mmlu_collate_fn

test_dataloader = dict(
    batch_size=4,
    num_workers=0,
    dataset=dict(type=MMLUDataset, data_file='{data}', tokenizer=tokenizer,
                 prompt_template=prompt_template),
    sampler=dict(type=DefaultSampler, shuffle=False),
    collate_fn=dict(type=mmlu_collate_fn))
test_cfg = dict(type=TestLoop)
test_evaluator = dict(type=MMLUMetric, tokenizer=tokenizer)
"""


def _questions(path) -> list[str]:
    """40 questions in two subjects; 16 answers are A, 8 each B, C and D."""
    answers = []
    with open(path, "w", encoding="utf-8") as f:
        for i in range(40):
            answer = "ABCDA"[i % 5]
            record = {
                "question": f"What is {i} + {i}?",
                "A": str(2 * i),
                "B": str(i),
                "C": str(i + 1),
                "D": "0",
                "answer": answer,
                "subject": "math" if i < 20 else "more_math",
            }
            f.write(json.dumps(record) + "\n")
            answers.append(answer)
    return answers


def test_xtuner_test_reports_the_accuracy_of_the_checkpoint(tmp_path, demo_assets, capsys):
    cfg_path = write_config(tmp_path, demo_assets)
    data = tmp_path / "mmlu.jsonl"
    answers = _questions(data)
    with open(cfg_path, "a", encoding="utf-8") as f:
        f.write(TEST_PART.format(data=data))

    # A checkpoint whose final norm is zero: every logit is 0, so the first letter (A) wins
    # every tie and the accuracy is the share of A answers, 16/40 in all, 8/20 per subject.
    cfg = Config.fromfile(cfg_path)
    model = BUILDER.build(cfg.model)
    with torch.no_grad():
        model.llm.model.norm.weight.zero_()
    pth = tmp_path / "iter_1.pth"
    torch.save({"state_dict": model.state_dict(), "meta": {}}, pth)

    out = run_xtuner("test", cfg_path, "--checkpoint", str(pth), "--work-dir", str(tmp_path / "w"))
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads(out.stdout[out.stdout.rindex("{") :])
    assert metrics["mmlu/accuracy"] == answers.count("A") / 40 == 0.4
    assert metrics["mmlu/accuracy_math"] == metrics["mmlu/accuracy_more_math"] == 0.4

    # The base weights, against a naive reference: the HF model's own next-token logits after
    # each prompt, one prompt at a time, the best of the four letters.
    base = tmp_path / "base.pth"
    llm = BUILDER.build(cfg.model).llm
    torch.save({"state_dict": {"llm." + k: v for k, v in llm.state_dict().items()}}, base)
    assert (
        cli(["test", cfg_path, "--checkpoint", str(base), "--work-dir", str(tmp_path / "b")]) == 0
    )
    captured = capsys.readouterr().out
    base_metrics = json.loads(captured[captured.rindex("{") :])
    tokenizer = BUILDER.build(cfg.tokenizer)
    letters = [tokenizer(x, add_special_tokens=False).input_ids[-1] for x in "ABCD"]
    template = cfg.prompt_template
    correct = 0
    with open(data, encoding="utf-8") as f, torch.no_grad():
        for record, answer in zip(map(json.loads, f), answers):
            options = "".join(f"\n{x}. {record[x]}" for x in "ABCD")
            text = template.INSTRUCTION.format(input=f"{record['question']}{options}\nAnswer:")
            logits = llm(tokenizer(text, return_tensors="pt").input_ids).logits[0, -1]
            correct += "ABCD"[int(logits[letters].argmax())] == answer
    assert base_metrics["mmlu/accuracy"] == correct / 40


def test_xtuner_test_without_a_test_set_says_what_is_missing(tmp_path, demo_assets, capsys):
    cfg_path = write_config(tmp_path, demo_assets)
    pth = tmp_path / "x.pth"
    pth.write_bytes(b"")
    assert cli(["test", cfg_path, "--checkpoint", str(pth)]) == 1
    assert "has no test_dataloader, test_cfg, test_evaluator" in capsys.readouterr().err
    assert cli(["test", cfg_path, "--checkpoint", str(tmp_path / "none.pth")]) == 1
    assert "none.pth: no such file" in capsys.readouterr().err
