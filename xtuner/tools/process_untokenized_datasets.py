"""``xtuner process_untokenized_datasets CONFIG --save-folder DIR``: tokenise a config's data
once, offline.

The training data set of CONFIG (a ``process_hf_dataset`` config) is mapped, templated,
tokenised and truncated exactly as training would do it, but not shuffled or packed, and saved
with ``datasets.save_to_disk``. To train on it, change only the data set part of the config::

    train_dataset = dict(
        type=process_hf_dataset,
        dataset=dict(type=load_from_disk, dataset_path=DIR),  # from datasets import load_from_disk
        do_dataset_tokenization=False,
        dataset_map_fn=None,
        template_map_fn=None,
        max_dataset_length=None,  # the saved data is already the subset
        ...  # tokenizer, max_length, packing, shuffling: unchanged
    )

Training then sees the same samples, in the same order, as with on-the-fly processing
(when the config keeps no ``max_dataset_length``: the seeded subset draw also moves the
packing shuffle).
"""

from __future__ import annotations

import argparse
import os.path as osp

from xtuner.tools.utils import UserError, add_cfg_options, load_config, run_tool

PROG = "xtuner process_untokenized_datasets"


def dataset_config(cfg, kind: str):
    """The config's ``train_dataloader.dataset``, checked to be built by ``kind``."""
    dataset = cfg.get("train_dataloader", {}).get("dataset")
    if dataset is None:
        raise UserError("the config has no train_dataloader.dataset")
    name = getattr(dataset.get("type"), "__name__", dataset.get("type"))
    if name != kind:
        raise UserError(
            f"train_dataloader.dataset has type {name!r}; this tool pre-tokenises {kind} "
            "data sets only"
        )
    return dataset


def check_save_folder(path: str) -> None:
    if osp.exists(path):
        raise UserError(f"--save-folder {path} exists; give a new folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="a training config (path or bundled name)")
    parser.add_argument("--save-folder", required=True, help="where the tokenised data goes")
    add_cfg_options(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        from xtuner.dataset import process_hf_dataset

        check_save_folder(args.save_folder)
        dataset_cfg = dataset_config(
            load_config(args.config, args.cfg_options), "process_hf_dataset"
        )
        if dataset_cfg.get("do_dataset_tokenization") is False:
            raise UserError(
                "train_dataloader.dataset is already tokenised (do_dataset_tokenization)"
            )
        options = {k: v for k, v in dataset_cfg.items() if k != "type"}
        options.update(pack_to_max_length=False, use_varlen_attn=False, remove_unused_columns=True)
        dataset = process_hf_dataset(**options)
        dataset = dataset.remove_columns([c for c in ("length",) if c in dataset.column_names])
        dataset.save_to_disk(args.save_folder)
        print(
            f"saved {len(dataset)} tokenised samples to {args.save_folder}; train on them with "
            "dataset=dict(type=load_from_disk, dataset_path=...), do_dataset_tokenization=False, "
            "dataset_map_fn=None, template_map_fn=None, max_dataset_length=None"
        )
        return 0

    return run_tool(body, PROG)
