"""``xtuner convert pth_to_hf CONFIG PTH SAVE_DIR``: a training checkpoint to an HF model.

PTH is an mmengine checkpoint file (``iter_N.pth``) or the DeepSpeed checkpoint folder of any
ZeRO stage (``iter_N.pth/``; its partitions are merged with DeepSpeed's ``zero_to_fp32``). With
LoRA the adapter is saved (merge it with ``xtuner convert merge``); LLaVA models take
``--save-format xtuner|huggingface|official``.
"""

from __future__ import annotations

import argparse

from xtuner.tools.utils import UserError, add_cfg_options, load_config, run_tool


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xtuner convert pth_to_hf", description=__doc__)
    parser.add_argument("config", help="the training config (path or bundled name)")
    parser.add_argument("pth_model", help="checkpoint file or DeepSpeed checkpoint folder")
    parser.add_argument("save_dir", help="where the HF model is written")
    parser.add_argument("--fp32", action="store_true", help="save in fp32 (default 16-bit)")
    parser.add_argument("--max-shard-size", default="2GB", help="e.g. 2GB")
    parser.add_argument(
        "--safe-serialization", action="store_true", default=True, help="safetensors (default)"
    )
    parser.add_argument(
        "--save-format", default=None, help="LLaVA: xtuner (default), huggingface or official"
    )
    add_cfg_options(parser)

    def body() -> int:
        # Arguments first: a mistyped flag is reported before torch loads.
        args = parser.parse_args(argv)
        from xtuner.model.utils import load_checkpoint_state
        from xtuner.registry import BUILDER

        cfg = load_config(args.config, args.cfg_options)
        if args.save_format in ("huggingface", "official"):
            # These formats merge LoRA into the LLM, which a quantized base cannot take: the
            # base is built unquantized (the checkpoint holds only the trained weights).
            llm = cfg.model.get("llm")
            if isinstance(llm, dict) and llm.pop("quantization_config", None) is not None:
                print(
                    f"building the LLM without its quantization_config (--save-format "
                    f"{args.save_format} merges the adapter)"
                )
        if "pretrained_pth" in cfg.model:
            cfg.model.pretrained_pth = None  # an earlier stage's weights: the checkpoint has them
        model = BUILDER.build(cfg.model)
        try:
            state = load_checkpoint_state(args.pth_model)
        except FileNotFoundError as exc:
            raise UserError(str(exc)) from exc
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise UserError(
                f"{args.pth_model} does not fit this config's model: unexpected keys "
                f"{unexpected[:3]}... (is it the checkpoint of this config?)"
            )
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if trainable and not trainable & set(state):
            raise UserError(f"{args.pth_model} holds none of the model's trainable weights")
        kwargs = {}
        if args.save_format is not None:
            kwargs["save_format"] = args.save_format
        model.to_hf(
            cfg,
            args.save_dir,
            fp32=args.fp32,
            save_pretrained_kwargs=dict(
                max_shard_size=args.max_shard_size, safe_serialization=args.safe_serialization
            ),
            **kwargs,
        )
        print(f"saved to {args.save_dir}")
        return 0

    return run_tool(body, "xtuner convert pth_to_hf")
