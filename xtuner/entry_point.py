"""The ``xtuner`` command: ``xtuner MODE [ARGS]``.

Each mode is a module under :mod:`xtuner.tools` with ``main(argv) -> int``. The process exits
with the mode's status (upstream XTuner always exited 0). ``train`` re-launches itself under
torchrun when ``NPROC_PER_NODE`` or ``NNODES`` is greater than 1.
"""

from __future__ import annotations

import importlib
import os
import random
import subprocess
import sys

MODES = {
    "train": ("xtuner.tools.train", "train a model from a config (path or bundled name)"),
    "chat": ("xtuner.tools.chat", "chat with a model in the terminal, or answer a prompts file"),
    "test": ("xtuner.tools.test", "evaluate a checkpoint with the config's test set and metric"),
    "mmbench": ("xtuner.tools.mmbench", "answer an MMBench TSV with a LLaVA model"),
    "eval_refcoco": (
        "xtuner.tools.eval_refcoco",
        "RefCOCO grounding accuracy (IoU > 0.5) of a LLaVA model",
    ),
    "convert": (
        "xtuner.tools.model_converters",
        "pth_to_hf | merge | split: checkpoints to HF models",
    ),
    "list-cfg": ("xtuner.tools.list_cfg", "list the bundled configs [-p PATTERN]"),
    "copy-cfg": ("xtuner.tools.copy_cfg", "copy a bundled config: copy-cfg NAME DIR"),
    "log-dataset": ("xtuner.tools.log_dataset", "show processed samples of a config's data"),
    "check-custom-dataset": (
        "xtuner.tools.check_custom_dataset",
        "report every problem of a config's data in one pass",
    ),
    "process_untokenized_datasets": (
        "xtuner.tools.process_untokenized_datasets",
        "tokenise a config's training data once, offline (--save-folder DIR)",
    ),
    "process_untokenized_llava_data": (
        "xtuner.tools.process_untokenized_llava_data",
        "tokenise a LLaVA config's conversations once, offline (--save-folder DIR)",
    ),
    "tokenize_ftdp_datasets": (
        "xtuner.tools.tokenize_ftdp_datasets",
        "tokenise ftdp chat data into the intern-repo tokenized format",
    ),
    "get_data_order": (
        "xtuner.tools.get_data_order",
        "write the file order of an intern-repo data folder (data_order.txt)",
    ),
    "list-dataset-format": ("xtuner.tools.list_dataset_format", "list the data map functions"),
    "check-loss": (
        "xtuner.tools.check_loss",
        "check a config's loss (gradients, comparison with cross-entropy, A/B run)",
    ),
    "plot-log": ("xtuner.tools.plot_log", "draw logged scalars of runs into a PNG"),
    "version": (None, "print the version"),
    "help": (None, "show this help"),
}

HELP = """usage: xtuner MODE [ARGS]

Modes:
{modes}

Multi-process training: NPROC_PER_NODE=8 xtuner train CONFIG [--deepspeed deepspeed_zero2]
(also NNODES, NODE_RANK, ADDR, PORT for several machines). Run 'xtuner MODE -h' for a mode's
arguments."""


def _help() -> str:
    width = max(len(m) for m in MODES)
    lines = [f"  {mode.ljust(width)}  {text}" for mode, (_, text) in MODES.items()]
    return HELP.format(modes="\n".join(lines))


def _launch_torchrun(argv: list[str]) -> int:
    nnodes = int(os.environ.get("NNODES", 1))
    nproc = int(os.environ.get("NPROC_PER_NODE", 1))
    if nnodes > 1 and not (os.environ.get("ADDR") and os.environ.get("PORT")):
        print(
            f"xtuner train: NNODES={nnodes} needs ADDR and PORT: the address of the node with "
            "NODE_RANK=0 and a free port there, the same on every node",
            file=sys.stderr,
        )
        return 2
    port = os.environ.get("PORT") or str(random.randint(20000, 29999))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nnodes}",
        f"--node_rank={os.environ.get('NODE_RANK', 0)}",
        f"--nproc_per_node={nproc}",
        f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}",
        f"--master_port={port}",
        "-m",
        "xtuner.tools.train",
        *argv,
        "--launcher",
        "pytorch",
    ]
    return subprocess.call(cmd)


def _wants_torchrun(argv: list[str]) -> bool:
    multi = int(os.environ.get("NPROC_PER_NODE", 1)) > 1 or int(os.environ.get("NNODES", 1)) > 1
    return multi and "--launcher" not in argv and "LOCAL_RANK" not in os.environ


def cli(argv: list[str] | None = None) -> int:
    """Entry point of the ``xtuner`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("help", "-h", "--help"):
        print(_help())
        return 0
    mode, rest = argv[0], argv[1:]
    if mode in ("version", "--version", "-v"):
        from xtuner import __version__

        print(__version__)
        return 0
    if mode not in MODES:
        import difflib

        close = difflib.get_close_matches(mode, MODES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"xtuner: unknown mode '{mode}'.{hint}\n\n{_help()}", file=sys.stderr)
        return 2
    if mode == "train" and _wants_torchrun(rest):
        return _launch_torchrun(rest)
    module = importlib.import_module(MODES[mode][0])
    return int(module.main(rest) or 0)


def main() -> None:
    sys.exit(cli())


if __name__ == "__main__":
    main()
