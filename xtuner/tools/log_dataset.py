"""``xtuner log-dataset CONFIG``: show processed training samples of a config.

For each sample: the rendered text (what the model reads), the masked text (only the tokens
trained on; masked runs shown as ``[-100 x N]``), the input ids and the labels.
"""

from __future__ import annotations

import argparse

from xtuner.utils.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from .utils import UserError, load_config, run_tool

PROG = "xtuner log-dataset"
SHOW = ("text", "masked_text", "input_ids", "labels", "all")


def render(tokenizer, ids: list[int]) -> str:
    """Decodes ids, writing ``<image>`` where the image token index stands."""
    pieces, run = [], []
    for token in ids:
        if token == IMAGE_TOKEN_INDEX:
            pieces += [tokenizer.decode(run), "<image>"]
            run = []
        else:
            run.append(token)
    pieces.append(tokenizer.decode(run))
    return "".join(pieces)


def render_masked(tokenizer, labels: list[int]) -> str:
    """The trained tokens as text; each run of masked tokens becomes ``[-100 x N]``."""
    pieces, run, masked = [], [], 0
    for label in [*labels, None]:
        if label == IGNORE_INDEX:
            if run:
                pieces.append(tokenizer.decode(run))
                run = []
            masked += 1
            continue
        if masked:
            pieces.append(f"[-100 x {masked}]")
            masked = 0
        if label is not None:
            run.append(label)
    if run:
        pieces.append(tokenizer.decode(run))
    return "".join(pieces)


def _section(title: str, body) -> None:
    print(f"{'#' * 20} {title} {'#' * 20}")
    print(body)


def _run(args) -> int:
    from xtuner.registry import BUILDER

    cfg = load_config(args.config)
    dataset_cfg = cfg.train_dataloader.dataset if "train_dataloader" in cfg else cfg.train_dataset
    tokenizer_cfg = cfg.get("tokenizer") or dataset_cfg.get("tokenizer")
    if tokenizer_cfg is None:
        raise UserError("the config has no 'tokenizer' to decode the samples with")
    tokenizer = BUILDER.build(tokenizer_cfg) if isinstance(tokenizer_cfg, dict) else tokenizer_cfg
    dataset = BUILDER.build(dataset_cfg)
    if not 0 <= args.index < len(dataset):
        raise UserError(f"--index {args.index} is outside the {len(dataset)} samples")
    show = set(SHOW[:-1]) if args.show == "all" else {args.show}
    for index in range(args.index, min(args.index + args.num, len(dataset))):
        sample = dataset[index]
        print(f"sample {index} of {len(dataset)} ({len(sample['input_ids'])} tokens)")
        if "text" in show:
            _section("text", render(tokenizer, sample["input_ids"]))
        if "masked_text" in show:
            _section("masked text", render_masked(tokenizer, sample["labels"]))
        if "input_ids" in show:
            _section("input_ids", sample["input_ids"])
        if "labels" in show:
            _section("labels", sample["labels"])
        if args.show == "all":
            for extra in ("loss_weight", "cumulative_len"):
                if sample.get(extra) is not None:
                    _section(extra, sample[extra])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="config file path or bundled config name")
    parser.add_argument("--show", default="all", choices=SHOW, help="what to print")
    parser.add_argument("--index", type=int, default=0, help="first sample to show")
    parser.add_argument("--num", type=int, default=1, help="how many samples to show")
    args = parser.parse_args(argv)
    return run_tool(lambda: _run(args), PROG)
