"""Bundled configs: ``cfgs_name_path`` maps each config's name to its file."""

from __future__ import annotations

import os
import os.path as osp

CONFIG_DIR = osp.dirname(osp.abspath(__file__))


def _find_configs() -> dict[str, str]:
    found = {}
    for root, _, files in os.walk(CONFIG_DIR):
        for name in files:
            if name.endswith(".py") and not name.startswith("_"):
                found[name[:-3]] = osp.join(root, name)
    return dict(sorted(found.items()))


cfgs_name_path = _find_configs()
