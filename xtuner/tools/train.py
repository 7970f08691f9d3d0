"""``xtuner train CONFIG``: train from an XTuner config (a path or a bundled name)."""

from __future__ import annotations

import argparse
import copy
import json
import os
import os.path as osp

from xtuner._compat import adapt_config_to_device, trust_checkpoint_path
from xtuner.tools.utils import UserError, add_cfg_options, load_config, run_tool

DEEPSPEED_DIR = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), "configs", "deepspeed")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(prog="xtuner train", description=__doc__)
    parser.add_argument("config", help="config file or bundled config name")
    parser.add_argument("--work-dir", help="where logs and checkpoints go")
    parser.add_argument(
        "--deepspeed",
        help="a bundled preset (deepspeed_zero1, deepspeed_zero2, deepspeed_zero2_offload, "
        "deepspeed_zero3, deepspeed_zero3_offload) or a DeepSpeed JSON file",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        help="resume from a checkpoint; without a path, from the latest one in the work dir",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    add_cfg_options(parser)
    parser.add_argument(
        "--launcher",
        choices=["none", "pytorch", "slurm", "mpi"],
        default="none",
        help="job launcher",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser.parse_args(argv)


def deepspeed_config(name_or_path: str, cfg) -> dict:
    """Loads a DeepSpeed JSON and fills its ``"auto"`` fields from the config."""
    path = name_or_path
    if not osp.isfile(path):
        path = osp.join(DEEPSPEED_DIR, f"{name_or_path}.json")
    if not osp.isfile(path):
        presets = sorted(f[:-5] for f in os.listdir(DEEPSPEED_DIR) if f.endswith(".json"))
        raise UserError(
            f"--deepspeed {name_or_path!r} is neither a JSON file nor a bundled preset "
            f"({', '.join(presets)})"
        )
    with open(path, encoding="utf-8") as f:
        ds = json.load(f)
    optim = cfg.optim_wrapper
    dtype = str(optim.get("dtype", "")) if _wrapper_name(optim) == "AmpOptimWrapper" else ""
    clip = (optim.get("clip_grad") or {}).get("max_norm", 0.0)
    filled = {
        "gradient_accumulation_steps": optim.get("accumulative_counts", 1),
        "train_micro_batch_size_per_gpu": cfg.train_dataloader.get("batch_size", 1),
        "gradient_clipping": clip,
    }
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None) if ds.get("train_batch_size") == "auto" else None
    for key, wanted in (("fp16", "float16"), ("bf16", "bfloat16")):
        section = ds.get(key)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = wanted in dtype
    return ds


def _wrapper_name(optim) -> str:
    wrapper = optim.get("type", "")
    return wrapper if isinstance(wrapper, str) else getattr(wrapper, "__name__", "")


def _use_deepspeed(cfg, name_or_path: str) -> None:
    import torch
    from mmengine.logging import print_log

    ds = deepspeed_config(name_or_path, cfg)
    if not torch.cuda.is_available() and ds.get("fp16", {}).get("enabled") is True:
        ds["fp16"]["enabled"] = False
        ds.setdefault("bf16", {})["enabled"] = True
        print_log("DeepSpeed on CPU has no fp16: using bf16 instead", "current", level=30)
    cfg.strategy = dict(
        type="DeepSpeedStrategy",
        config=ds,
        exclude_frozen_parameters=True,
        gradient_accumulation_steps=ds["gradient_accumulation_steps"],
        train_micro_batch_size_per_gpu=ds["train_micro_batch_size_per_gpu"],
        gradient_clipping=ds.get("gradient_clipping", 0.0),
        fp16=ds.get("fp16"),
        bf16=ds.get("bf16"),
    )
    import xtuner.engine.optim  # noqa: F401  (registers DeepSpeedGradNormOptimWrapper)

    cfg.optim_wrapper = dict(
        type="DeepSpeedGradNormOptimWrapper", optimizer=cfg.optim_wrapper.optimizer
    )
    cfg.runner_type = "FlexibleRunner"


def build_runner(args):
    from mmengine.logging import print_log

    cfg = load_config(args.config, args.cfg_options)
    for change in adapt_config_to_device(cfg):
        print_log(change, "current", level=30)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(cfg.filename))[0])
    if args.seed is not None:
        cfg.randomness = dict(cfg.get("randomness") or {}, seed=args.seed)
    trust_checkpoint_path(cfg.work_dir)
    if args.resume is not None:
        cfg.resume = True
        if args.resume != "auto":
            if not osp.exists(args.resume):
                raise UserError(f"--resume {args.resume}: no such checkpoint")
            cfg.load_from = args.resume
    if cfg.get("load_from"):
        trust_checkpoint_path(cfg.load_from)
    if args.deepspeed:
        _use_deepspeed(cfg, args.deepspeed)
    sp = int(cfg.get("sequence_parallel_size", 1))
    if cfg.get("runner_type") == "FlexibleRunner":
        from mmengine.runner import FlexibleRunner

        runner = FlexibleRunner.from_cfg(copy.deepcopy(cfg))
    else:
        from mmengine.runner import Runner

        runner = Runner.from_cfg(cfg)
    return runner, sp


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        # Arguments first: a mistyped flag is reported before mmengine and torch load.
        args = parse_args(argv)
        runner, sp = build_runner(args)
        from xtuner.parallel.sequence import init_sequence_parallel

        init_sequence_parallel(sp)
        runner.train()
        return 0

    return run_tool(body, "xtuner train")


if __name__ == "__main__":
    raise SystemExit(main())
