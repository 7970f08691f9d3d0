"""``xtuner check-loss CONFIG``: the checks to run before trusting a loss for a long run.

Uses the config's own model, data and ``loss``, on a small slice of the data:

1. Gradients. The loss module alone under ``torch.autograd.gradcheck`` in float64 on a
   small synthetic batch (random hidden states and head, a tiny chunk size so chunking is
   exercised); a loss that is detached from its inputs or constant is named as such. Then,
   on real batches, every trainable parameter group (the LLM, LoRA adapters, projector,
   ...) must receive finite, non-zero gradients wherever the baseline loss's gradients
   reach; loss values, terms, per-token losses and gradients are scanned for NaN/Inf.
2. Comparison on ``--batches`` batches, same weights: loss value, gradient norm, cosine
   similarity between the configured loss's gradient and the baseline's, and quantiles of
   the per-token losses (token losses only; full losses report "n/a").
3. A/B run: ``--steps`` optimizer steps with each loss from the same initial weights on the
   same batches (the config's optimizer and gradient clipping, constant learning rate, one
   batch per step); both loss curves and the baseline objective of both runs go to a CSV
   and a PNG, with the time of each step and the peak memory of a forward and backward.
4. A summary table; the exit status is 1 when a check fails, with the reasons on one line.

Everything lands in ``--out`` (``report.json``, ``ab_curves.csv``, ``ab_curves.png``).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from typing import Any

from xtuner.tools.utils import UserError, add_cfg_options, run_tool

DEFAULT_BATCHES = 4
DEFAULT_STEPS = 20


# command line ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="xtuner check-loss", description=__doc__.split("\n")[0])
    parser.add_argument("config", help="config file or bundled config name")
    parser.add_argument(
        "--batches", type=int, default=DEFAULT_BATCHES, help="batches to compare on (default 4)"
    )
    parser.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="A/B optimizer steps, 0 to skip (20)"
    )
    parser.add_argument(
        "--baseline",
        default="CrossEntropyLoss",
        help="the loss to compare with: a name, a dotted path, or a dict such as "
        "\"dict(type='FocalLoss', gamma=1.0)\" (default: CrossEntropyLoss)",
    )
    parser.add_argument("--out", help="output folder (default: work_dirs/<config>/check_loss)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--device", help="where the model runs (default: cuda when available, else cpu)"
    )
    add_cfg_options(parser)
    args = parser.parse_args(argv)
    if args.batches < 1:
        raise UserError(f"--batches must be >= 1, got {args.batches}")
    if args.steps < 0:
        raise UserError(f"--steps must be >= 0, got {args.steps}")
    args.baseline = parse_loss_spec(args.baseline)
    return args


def parse_loss_spec(text: str) -> Any:
    """``--baseline``: a loss name or dotted path, or a literal dict/list of loss dicts.

    ``dict(type='X', k=v)`` call syntax is accepted as in configs; nothing is executed.
    """
    text = text.strip()
    if re.fullmatch(r"[A-Za-z_][\w.]*", text):
        return {"type": text}
    try:
        return _literal(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError) as exc:
        raise UserError(
            f"--baseline {text!r}: give a loss name ('FocalLoss'), a dotted path, or a dict "
            f"such as \"dict(type='FocalLoss', gamma=1.0)\" of literal values ({exc})"
        ) from exc


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        if node.args or any(kw.arg is None for kw in node.keywords):
            raise ValueError("dict(...) takes keyword arguments only")
        return {kw.arg: _literal(kw.value) for kw in node.keywords}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        # Arguments first: a mistyped flag is reported before torch loads.
        args = parse_args(argv)
        from xtuner.tools.loss_checks import check, print_report

        report = check(args)
        print_report(report)
        if report["status"] == "fail":
            print(f"check-loss: FAIL: {report['reason']}", file=sys.stderr)
            return 1
        warnings = sum(c["status"] == "WARN" for c in report["checks"])
        print(f"check-loss: PASS{f' ({warnings} warnings)' if warnings else ''}")
        return 0

    return run_tool(body, "xtuner check-loss")


if __name__ == "__main__":
    raise SystemExit(main())
