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
    parser.add_argument(
        "--dist-timeout",
        type=int,
        default=int(os.environ.get("XTUNER_DIST_TIMEOUT", 1800)),
        help="seconds a collective may wait for the other ranks before the job fails "
        "(default 1800, or $XTUNER_DIST_TIMEOUT)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser.parse_args(argv)


def deepspeed_config(name_or_path: str, cfg, bf16_supported: bool | None = None) -> dict:
    """Loads a DeepSpeed JSON and makes it agree with the config (see docs/en/distributed.md).

    The config decides the micro-batch size (the dataloader's ``batch_size``), the gradient
    accumulation (``optim_wrapper.accumulative_counts``) and the gradient clipping
    (``optim_wrapper.clip_grad.max_norm``; none is 0), whatever the JSON says. The precision
    follows the JSON where it sets ``fp16``/``bf16`` ``"enabled"`` explicitly, else the
    config: ``OptimWrapper`` trains in fp32, ``AmpOptimWrapper`` with
    ``dtype='bfloat16'`` in bf16, and with ``'float16'`` or no dtype in bf16 where the GPU
    supports it, else fp16 (upstream's ``"auto"``). A warning lists what the JSON set
    explicitly and what the config overrode.

    Args:
        name_or_path: a bundled preset name or a DeepSpeed JSON file.
        cfg: the training config.
        bf16_supported: whether the GPU has bf16; None asks torch.

    Returns:
        The DeepSpeed config, with no ``"auto"`` left in the fields above.
    """
    path = name_or_path
    if not osp.isfile(path):
        path = osp.join(DEEPSPEED_DIR, f"{name_or_path}.json")
    if not osp.isfile(path):
        presets = sorted(f[:-5] for f in os.listdir(DEEPSPEED_DIR) if f.endswith(".json"))
        raise UserError(
            f"--deepspeed {name_or_path!r} is neither a JSON file nor a bundled preset "
            f"({', '.join(presets)})"
        )
    try:
        with open(path, encoding="utf-8") as f:
            ds = json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"--deepspeed {path}: invalid JSON at line {exc.lineno}: {exc.msg}"
        ) from exc
    kept, overridden = [], []
    for key, value in _options_from_config(cfg, path).items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            overridden.append(f"{key}={given!r} -> {value!r}")
        ds[key] = value
    given = ds.pop("train_batch_size", "auto")
    if given != "auto":
        overridden.append(f"train_batch_size={given!r} -> micro batch x accumulation x ranks")
    precision = _precision_from_config(cfg.optim_wrapper, bf16_supported)
    explicit = {}
    for key in ("fp16", "bf16"):
        section = ds.setdefault(key, {})
        if not isinstance(section, dict):
            raise UserError(f"--deepspeed {path}: {key!r} must be an object, got {section!r}")
        enabled = section.get("enabled", "auto")
        if enabled != "auto":
            explicit[key] = bool(enabled)
            if bool(enabled) != (precision == key):
                kept.append(f"{key}.enabled={enabled!r} (the config gives {precision})")
    if explicit.get("fp16") and explicit.get("bf16"):
        raise UserError(
            f"--deepspeed {path} enables both fp16 and bf16: enable one of them "
            '(or set both to "auto" to follow the config)'
        )
    chosen = next((k for k, on in explicit.items() if on), None)
    if chosen is None:
        chosen = precision if precision not in explicit else "fp32"
    for key in ("fp16", "bf16"):
        ds[key]["enabled"] = key == chosen
    if kept or overridden:
        from mmengine.logging import print_log

        lines = []
        if kept:
            lines.append("kept from the JSON: " + ", ".join(kept))
        if overridden:
            lines.append("overridden by the config: " + ", ".join(overridden))
        print_log(f"DeepSpeed config {path}: " + "; ".join(lines), "current", level=30)
    return ds


def _options_from_config(cfg, path: str) -> dict:
    """The DeepSpeed options that the config decides."""
    optim = cfg.optim_wrapper
    clip = optim.get("clip_grad") or {}
    if clip.get("type", "norm") != "norm":
        raise UserError(
            f"optim_wrapper.clip_grad.type={clip['type']!r}: DeepSpeed ({path}) clips by norm "
            "only; use clip_grad=dict(max_norm=...)"
        )
    return {
        "gradient_accumulation_steps": int(optim.get("accumulative_counts", 1)),
        "train_micro_batch_size_per_gpu": int(cfg.train_dataloader.get("batch_size", 1)),
        "gradient_clipping": float(clip.get("max_norm", 0.0)),
    }


def _precision_from_config(optim, bf16_supported: bool | None) -> str:
    """'fp32', 'bf16' or 'fp16': what the config's optim wrapper asks for."""
    if _wrapper_name(optim) != "AmpOptimWrapper":
        return "fp32"
    dtype = str(optim.get("dtype") or "auto").removeprefix("torch.")
    if dtype in ("bfloat16", "bf16"):
        return "bf16"
    if dtype not in ("float16", "fp16", "half", "auto"):
        raise UserError(
            f"optim_wrapper.dtype={optim.get('dtype')!r}: use 'bfloat16', 'float16' or leave it out"
        )
    if bf16_supported is None:
        import torch

        bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if bf16_supported else "fp16"


def _wrapper_name(optim) -> str:
    wrapper = optim.get("type", "")
    return wrapper if isinstance(wrapper, str) else getattr(wrapper, "__name__", "")


#: transformers' handle on the ZeRO-3 config; while it lives, ``from_pretrained`` builds the
#: model under ``deepspeed.zero.Init`` (each rank allocates only its partition).
_HF_DEEPSPEED_CONFIG = None


def _use_deepspeed(cfg, name_or_path: str) -> None:
    import torch
    from mmengine.logging import print_log

    global _HF_DEEPSPEED_CONFIG
    ds = deepspeed_config(name_or_path, cfg)
    if not torch.cuda.is_available() and ds["fp16"]["enabled"]:
        ds["fp16"]["enabled"] = False
        ds["bf16"]["enabled"] = True
        print_log("DeepSpeed on CPU has no fp16: using bf16 instead", "current", level=30)
    cfg.strategy = dict(
        type="DeepSpeedStrategy",
        config=ds,
        exclude_frozen_parameters=True,
        gradient_accumulation_steps=ds["gradient_accumulation_steps"],
        train_micro_batch_size_per_gpu=ds["train_micro_batch_size_per_gpu"],
        gradient_clipping=ds["gradient_clipping"],
        fp16=ds["fp16"],
        bf16=ds["bf16"],
    )
    import xtuner.engine.optim  # noqa: F401  (registers DeepSpeedGradNormOptimWrapper)

    cfg.optim_wrapper = dict(
        type="DeepSpeedGradNormOptimWrapper", optimizer=cfg.optim_wrapper.optimizer
    )
    cfg.runner_type = "FlexibleRunner"
    if ds.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DEEPSPEED_CONFIG = HfDeepSpeedConfig(copy.deepcopy(ds))
    if cfg.launcher == "none":
        # DeepSpeed needs a process group even for one process: a one-rank group here.
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        cfg.launcher = "pytorch"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_runner(args, cfg):
    from mmengine.logging import print_log

    for change in adapt_config_to_device(cfg):
        print_log(change, "current", level=30)
    cfg.launcher = args.launcher
    # A rank that hangs in a collective (its peer died or diverged) fails after this long.
    env_cfg = cfg.setdefault("env_cfg", {})
    env_cfg.setdefault("dist_cfg", {})["timeout"] = args.dist_timeout
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
        cfg = load_config(args.config, args.cfg_options)
        framework = cfg.get("framework", "mmengine")
        if framework == "huggingface":
            from xtuner.tools.train_hf import train_with_hf_trainer

            return train_with_hf_trainer(cfg, args)
        if framework != "mmengine":
            raise UserError(
                f"config {args.config}: framework={framework!r}; use 'mmengine' (the default) "
                "or 'huggingface' (the HF Trainer, see docs/en/compatibility.md)"
            )
        runner, sp = build_runner(args, cfg)
        from xtuner.parallel.sequence import init_sequence_parallel

        init_sequence_parallel(sp)
        runner.train()
        return 0

    return run_tool(body, "xtuner train")


if __name__ == "__main__":
    raise SystemExit(main())
