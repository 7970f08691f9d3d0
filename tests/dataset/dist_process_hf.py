"""Run by test_huggingface.py as 2 ranks (env:// init): process_hf_dataset, twice."""

import hashlib
import json
import os
import sys

import torch.distributed as dist
from datasets import load_dataset
from transformers import AutoTokenizer

import xtuner.dataset.huggingface as hf
from xtuner.dataset.map_fns import template_map_fn_factory
from xtuner.utils import PROMPT_TEMPLATE


def main() -> None:
    data_path, tokenizer_path, out_dir = sys.argv[1:4]
    dist.init_process_group("gloo")
    calls = []
    process = hf._process

    def counted(*args, **kwargs):
        calls.append(True)
        return process(*args, **kwargs)

    hf._process = counted
    processed, digest = [], None
    for _ in range(2):  # the second call is a restart: everyone loads the cache
        before = len(calls)
        dataset = hf.process_hf_dataset(
            dict(type=load_dataset, path="json", data_files=data_path, split="train"),
            tokenizer=AutoTokenizer.from_pretrained(tokenizer_path),
            max_length=32,
            template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.default),
        )
        processed.append(len(calls) > before)
        digest = hashlib.sha256(json.dumps(dataset["input_ids"][:]).encode()).hexdigest()
    rank = dist.get_rank()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"processed": processed, "digest": digest}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
