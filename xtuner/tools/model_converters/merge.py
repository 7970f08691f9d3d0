"""``xtuner convert merge BASE ADAPTER SAVE_DIR``: fold a LoRA adapter into its base model."""

from __future__ import annotations

import argparse

from xtuner.tools.utils import run_tool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xtuner convert merge", description=__doc__)
    parser.add_argument("base", help="the base HF model folder")
    parser.add_argument("adapter", help="the adapter folder (pth_to_hf output)")
    parser.add_argument("save_dir", help="where the merged model is written")
    parser.add_argument("--max-shard-size", default="2GB")

    def body() -> int:
        # Arguments first: a mistyped flag is reported before torch loads.
        args = parser.parse_args(argv)
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
        merged.save_pretrained(args.save_dir, max_shard_size=args.max_shard_size)
        for source in (args.adapter, args.base):
            try:
                AutoTokenizer.from_pretrained(source).save_pretrained(args.save_dir)
                break
            except (OSError, ValueError):
                continue
        print(f"merged model saved to {args.save_dir}")
        return 0

    return run_tool(body, "xtuner convert merge")
