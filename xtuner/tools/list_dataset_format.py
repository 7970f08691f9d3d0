"""``xtuner list-dataset-format``: list the dataset map functions configs can name."""

from __future__ import annotations

import argparse

import xtuner.dataset.map_fns  # noqa: F401 (registers the bundled map functions)
from xtuner.registry import MAP_FUNC


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xtuner list-dataset-format", description=__doc__)
    parser.parse_args(argv)
    names = sorted(MAP_FUNC.module_dict)
    width = max(map(len, names), default=0)
    print("dataset_map_fn names (use one in a config, or import the function):")
    for name in names:
        doc = (MAP_FUNC.get(name).__doc__ or "").strip().splitlines()
        print(f"  {name.ljust(width)}  {doc[0] if doc else ''}")
    return 0
