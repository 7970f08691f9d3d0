"""Writes remote-code checkpoint folders (what ``trust_remote_code=True`` loads) for tests."""

from __future__ import annotations

import json
import os
import os.path as osp
import textwrap


def write_remote_code(folder: str, code: dict[str, str], config: dict) -> None:
    """Writes the code files (name -> source) and ``config.json`` into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for name, source in code.items():
        with open(osp.join(folder, name), "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(source))
    with open(osp.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
