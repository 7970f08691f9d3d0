"""``xtuner list-dataset-format``: list the dataset map functions configs can name."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xtuner list-dataset-format", description=__doc__)
    parser.parse_args(argv)
    import xtuner.dataset.map_fns  # noqa: F401 (registers the bundled map functions)
    from xtuner.registry import MAP_FUNC

    # module_dict, not MAP_FUNC.get: its location lookup imports mmengine.dist and torch.
    functions = dict(sorted(MAP_FUNC.module_dict.items()))
    width = max(map(len, functions), default=0)
    print("dataset_map_fn names (use one in a config, or import the function):")
    for name, fn in functions.items():
        doc = (fn.__doc__ or "").strip().splitlines()
        print(f"  {name.ljust(width)}  {doc[0] if doc else ''}")
    return 0
