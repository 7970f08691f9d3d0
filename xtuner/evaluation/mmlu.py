"""MMLU-style multiple choice: the model answers with the letter whose logit is highest.

A record has ``question``, ``A``, ``B``, ``C``, ``D``, ``answer`` (a letter) and optionally
``subject`` (JSON lines or CSV with a header). The prompt lists the question and the options
and ends with ``Answer:``, inside the prompt template's instruction when one is given; the
model's prediction is the option letter with the highest next-token logit after the prompt.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from collections.abc import Sequence

from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS
from torch.utils.data import Dataset

from xtuner.dataset.collate_fns.mmlu_collate_fn import LETTERS, mmlu_collate_fn
from xtuner.registry import BUILDER

__all__ = ["MMLUDataset", "MMLUMetric", "mmlu_collate_fn"]


def _build(obj):
    return BUILDER.build(obj) if isinstance(obj, dict) else obj


def read_records(path: str) -> list[dict]:
    """The records of a ``.jsonl`` or ``.csv`` file, each checked for the needed fields."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".csv"):
            records = list(csv.DictReader(f))
        else:
            records = [json.loads(line) for line in f if line.strip()]
    for i, record in enumerate(records):
        missing = [k for k in ("question", *LETTERS, "answer") if k not in record]
        if missing or str(record["answer"]).strip() not in LETTERS:
            raise ValueError(
                f"{path} record {i}: needs question, A, B, C, D and answer (one of A-D); "
                f"missing {missing}, answer {record.get('answer')!r}"
            )
    return records


def format_question(record: dict) -> str:
    options = "\n".join(f"{letter}. {record[letter]}" for letter in LETTERS)
    return f"{record['question']}\n{options}\nAnswer:"


class MMLUDataset(Dataset):
    """Tokenised multiple-choice prompts.

    Args:
        data_file: a ``.jsonl`` or ``.csv`` file of records (see the module docstring).
        tokenizer: the tokenizer or its config.
        prompt_template: a ``PROMPT_TEMPLATE`` entry, or None for the bare prompt.
    """

    def __init__(self, data_file: str, tokenizer, prompt_template: dict | None = None):
        self.tokenizer = _build(tokenizer)
        self.records = read_records(data_file)
        self.template = prompt_template

    def __len__(self) -> int:
        return len(self.records)

    def prompt(self, record: dict) -> str:
        text = format_question(record)
        if self.template is None:
            return text
        return self.template["INSTRUCTION"].format(input=text, round=1)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        ids = self.tokenizer(self.prompt(record)).input_ids
        return {
            "input_ids": ids,
            "answer": LETTERS.index(str(record["answer"]).strip()),
            "subject": record.get("subject") or "all",
        }


@METRICS.register_module()
class MMLUMetric(BaseMetric):
    """Accuracy of the option letter with the highest logit after each prompt.

    Args:
        tokenizer: the tokenizer (or its config) that gives the letters' token ids.
    """

    default_prefix = "mmlu"

    def __init__(self, tokenizer, **kwargs):
        super().__init__(**kwargs)
        tokenizer = _build(tokenizer)
        self.letter_ids = [tokenizer(x, add_special_tokens=False).input_ids[-1] for x in LETTERS]

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for output, sample in zip(data_samples, data_batch["data_samples"]):
            logits = output["logits"][sample["length"] - 1, self.letter_ids]
            predicted = int(logits.float().argmax())
            self.results.append((sample["subject"], predicted == sample["answer"]))

    def compute_metrics(self, results: list) -> dict[str, float]:
        by_subject: dict[str, list[bool]] = defaultdict(list)
        for subject, correct in results:
            by_subject[subject].append(correct)
        metrics = {"accuracy": sum(c for _, c in results) / len(results)}
        if len(by_subject) > 1:
            for subject, marks in sorted(by_subject.items()):
                metrics[f"accuracy_{subject}"] = sum(marks) / len(marks)
        return metrics
