"""``xtuner process_untokenized_llava_data CONFIG --save-folder DIR``: tokenise a LLaVA
config's conversations once, offline.

The text of the config's ``LLaVADataset`` (map function, template, tokenisation, truncation,
image tokens) is processed as training does it and saved with ``save_to_disk``; images stay
where they are and are read during training as before. To train on it, set in the config's
data set ``offline_processed_text_folder=DIR`` (``data_path`` is then not read); every sample,
images included, is the same as with on-the-fly processing.
"""

from __future__ import annotations

import argparse

from xtuner.tools.process_untokenized_datasets import check_save_folder, dataset_config
from xtuner.tools.utils import UserError, add_cfg_options, load_config, run_tool

PROG = "xtuner process_untokenized_llava_data"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="a LLaVA training config (path or bundled name)")
    parser.add_argument("--save-folder", required=True, help="where the tokenised text goes")
    add_cfg_options(parser)
    args = parser.parse_args(argv)

    def body() -> int:
        from xtuner.registry import BUILDER

        check_save_folder(args.save_folder)
        dataset_cfg = dataset_config(load_config(args.config, args.cfg_options), "LLaVADataset")
        if dataset_cfg.get("offline_processed_text_folder"):
            raise UserError("train_dataloader.dataset already reads offline_processed_text_folder")
        dataset = BUILDER.build(dataset_cfg)
        dataset.text_data.save_to_disk(args.save_folder)
        print(
            f"saved the text of {len(dataset)} samples to {args.save_folder}; train on them "
            f"with offline_processed_text_folder={args.save_folder!r} in the data set"
        )
        return 0

    return run_tool(body, PROG)
