"""``xtuner get_data_order --data-folder DIR --save-folder OUT [--file-type .bin]``: write the
order in which intern-repo data files are read.

``OUT/data_order.txt`` lists the files of ``DIR`` ending in ``--file-type``, one path a line,
relative to ``DIR`` (so the list works on another machine), sub-folders walked in sorted order
and files sorted within each. Pass it as ``data_order_path`` to
``load_intern_repo_tokenized_dataset`` / ``load_intern_repo_untokenized_dataset`` to fix the
order (or to reorder or leave out files by editing it).
"""

from __future__ import annotations

import argparse
import os
import os.path as osp

from xtuner.tools.utils import UserError, run_tool

PROG = "xtuner get_data_order"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-folder", required=True, help="the data folder")
    parser.add_argument("--save-folder", required=True, help="where data_order.txt goes")
    parser.add_argument("--file-type", default=".bin", help="ending of the data files")
    args = parser.parse_args(argv)

    def body() -> int:
        from xtuner.dataset.intern_repo import list_data_files

        if not osp.isdir(args.data_folder):
            raise UserError(f"--data-folder {args.data_folder}: no such folder")
        files = list_data_files(args.data_folder, args.file_type)
        if not files:
            raise UserError(f"no file ending in {args.file_type!r} under {args.data_folder}")
        os.makedirs(args.save_folder, exist_ok=True)
        path = osp.join(args.save_folder, "data_order.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{name}\n" for name in files)
        print(f"{PROG}: {len(files)} files in {path}")
        return 0

    return run_tool(body, PROG)


if __name__ == "__main__":
    raise SystemExit(main())
