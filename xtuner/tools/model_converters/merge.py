"""``xtuner convert merge BASE ADAPTER SAVE_DIR``: fold a LoRA adapter into its base model.

``--is-clip`` merges a vision-encoder adapter (the ``visual_encoder_adapter`` folder a LLaVA
``pth_to_hf`` writes) into its CLIP vision model, and copies the image processor along.
``--device`` says where the merge runs (``cpu``, ``cuda``, or ``auto`` to spread a big model
over the GPUs). ``--trust-remote-code`` runs the code a remote-code base model ships
(ChatGLM, InternLM2, Baichuan2, ...), which transformers does not run unasked.
"""

from __future__ import annotations

import argparse

from xtuner.tools.utils import UserError, run_tool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xtuner convert merge", description=__doc__)
    parser.add_argument("base", help="the base HF model folder")
    parser.add_argument("adapter", help="the adapter folder (pth_to_hf output)")
    parser.add_argument("save_dir", help="where the merged model is written")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--is-clip", action="store_true", help="BASE is a CLIP vision model")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--safe-serialization", action="store_true", default=True)
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the modelling (and tokenizer) code that BASE ships (remote-code models)",
    )

    def body() -> int:
        # Arguments first: a mistyped flag is reported before torch loads.
        args = parser.parse_args(argv)
        import torch
        from peft import PeftModel

        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no GPU is visible; use --device cpu")
        load = {"dtype": torch.float32}
        load["device_map"] = "auto" if args.device == "auto" else {"": args.device}
        if args.is_clip:
            from transformers import AutoImageProcessor as Processor
            from transformers import CLIPVisionModel as Model
        else:
            from transformers import AutoModelForCausalLM as Model
            from transformers import AutoTokenizer as Processor
        trust = {"trust_remote_code": True} if args.trust_remote_code else {}
        try:
            model = Model.from_pretrained(args.base, **load, **trust)
        except ValueError as err:
            if args.trust_remote_code or "trust_remote_code" not in str(err):
                raise
            raise UserError(
                f"{args.base} is a remote-code model (its folder ships the modelling code): "
                "add --trust-remote-code to run that code, after reading it"
            ) from None
        merged = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
        merged.save_pretrained(
            args.save_dir,
            max_shard_size=args.max_shard_size,
            safe_serialization=args.safe_serialization,
        )
        for source in (args.adapter, args.base):
            try:
                Processor.from_pretrained(source, **trust).save_pretrained(args.save_dir)
                break
            except (OSError, ValueError):
                continue
        print(f"merged model saved to {args.save_dir}")
        return 0

    return run_tool(body, "xtuner convert merge")
