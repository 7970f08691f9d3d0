"""``xtuner list-cfg [-p PATTERN]``: list the bundled configs."""

from __future__ import annotations

import argparse

from xtuner.configs import cfgs_name_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xtuner list-cfg", description=__doc__)
    parser.add_argument("-p", "--pattern", default=None, help="only names containing PATTERN")
    args = parser.parse_args(argv)
    names = [n for n in cfgs_name_path if args.pattern is None or args.pattern.lower() in n.lower()]
    print("\n".join(names) if names else f"no bundled config matches {args.pattern!r}")
    return 0
