"""``xtuner test CONFIG --checkpoint PTH``: evaluate a checkpoint with the config's evaluator.

The config's ``test_dataloader``, ``test_cfg`` and ``test_evaluator`` (or, when it has no
test set, its ``val_*`` ones) run through mmengine's test loop on the model of the config with
the checkpoint's weights loaded; the metrics are printed and logged in the work dir. For
MMLU-style multiple choice see :mod:`xtuner.evaluation` (``MMLUDataset``, ``MMLUMetric``).
"""

from __future__ import annotations

import argparse
import json
import os.path as osp

from xtuner.tools.utils import UserError, add_cfg_options, load_config, run_tool

PROG = "xtuner test"
PARTS = ("dataloader", "cfg", "evaluator")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("config", help="the config (path or bundled name)")
    parser.add_argument("--checkpoint", required=True, help="a training checkpoint (.pth)")
    parser.add_argument("--work-dir", help="logs go here (default ./work_dirs/<config name>)")
    add_cfg_options(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        from mmengine.runner import Runner

        from xtuner._compat import trust_checkpoint_path

        if not osp.exists(args.checkpoint):
            raise UserError(f"--checkpoint {args.checkpoint}: no such file")
        cfg = load_config(args.config, args.cfg_options)
        complete = [s for s in ("test", "val") if all(cfg.get(f"{s}_{p}") for p in PARTS)]
        stage = complete[0] if complete else "test"
        missing = [f"test_{p}" for p in PARTS if cfg.get(f"test_{p}") is None]
        if not complete:
            raise UserError(
                f"config {args.config} has no {', '.join(missing)}: xtuner test needs "
                "test_dataloader, test_cfg and test_evaluator (or the val_ ones); see "
                "docs/en/chat.md for an MMLU-style example"
            )
        if stage == "val":
            for part in PARTS:
                cfg[f"test_{part}"] = cfg[f"val_{part}"]
        for key in ("train_dataloader", "train_cfg", "optim_wrapper", "param_scheduler"):
            cfg.pop(key, None)
        for key in ("val_dataloader", "val_cfg", "val_evaluator"):
            cfg.pop(key, None)
        cfg.load_from = args.checkpoint
        trust_checkpoint_path(args.checkpoint)
        if args.work_dir is not None:
            cfg.work_dir = args.work_dir
        elif cfg.get("work_dir") is None:
            cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(cfg.filename))[0])
        cfg.custom_hooks = []  # the training hooks (chat, throughput) have nothing to do here
        metrics = Runner.from_cfg(cfg).test()
        print(json.dumps(metrics, indent=2, sort_keys=True))
        return 0

    return run_tool(body, PROG)
