"""``xtuner convert pth_to_hf|merge|split``: training checkpoints to HF models, and back."""

from __future__ import annotations

import importlib
import sys

#: sub-command -> its module, imported only when that sub-command runs.
COMMANDS = {
    "pth_to_hf": "xtuner.tools.model_converters.pth_to_hf",
    "merge": "xtuner.tools.model_converters.merge",
    "split": "xtuner.tools.model_converters.split",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = f"usage: xtuner convert {{{'|'.join(COMMANDS)}}} ARGS ('-h' after one for its ARGS)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage, file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
