"""``xtuner copy-cfg NAME DIR``: copy a bundled config to edit it."""

from __future__ import annotations

import argparse
import os
import os.path as osp
import shutil

from xtuner.configs import cfgs_name_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xtuner copy-cfg", description=__doc__)
    parser.add_argument("config_name", help="a name from 'xtuner list-cfg'")
    parser.add_argument("save_dir", help="folder to copy it into")
    args = parser.parse_args(argv)
    if args.config_name not in cfgs_name_path:
        raise FileNotFoundError(
            f"no bundled config named {args.config_name!r}; 'xtuner list-cfg' lists them"
        )
    os.makedirs(args.save_dir, exist_ok=True)
    dst = osp.join(args.save_dir, f"{args.config_name}_copy.py")
    shutil.copyfile(cfgs_name_path[args.config_name], dst)
    print(f"copied to {dst}")
    return 0
