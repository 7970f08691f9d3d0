"""``xtuner convert pth_to_hf|merge|split``: training checkpoints to HF models, and back."""

from __future__ import annotations

import sys

from . import merge, pth_to_hf, split

COMMANDS = {"pth_to_hf": pth_to_hf, "merge": merge, "split": split}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: xtuner convert {{{'|'.join(COMMANDS)}}} ARGS", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]].main(argv[1:])
