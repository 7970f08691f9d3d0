"""Logs the size of the training data and one decoded sample before training."""

from __future__ import annotations

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS

from xtuner.registry import BUILDER
from xtuner.utils.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX


@HOOKS.register_module()
class DatasetInfoHook(Hook):
    """Args: tokenizer (or its config); is_intern_repo_dataset: data has no labels to show."""

    def __init__(self, tokenizer, is_intern_repo_dataset: bool = False):
        self.tokenizer = BUILDER.build(tokenizer) if isinstance(tokenizer, dict) else tokenizer
        self.is_intern_repo_dataset = is_intern_repo_dataset

    def _show(self, dataset, split: str) -> None:
        if dataset is None or len(dataset) == 0:
            return
        print_log(f"Num {split} samples {len(dataset)}", "current")
        print_log(f"{split} example:\n{self.decode(dataset[0].get('input_ids', []))}", "current")

    def decode(self, ids: list[int]) -> str:
        """Decodes ids, showing each image placeholder (-200) as ``<image>``."""
        parts, run = [], []
        for i in ids:
            if i == IMAGE_TOKEN_INDEX:
                parts += [self.tokenizer.decode(run), DEFAULT_IMAGE_TOKEN]
                run = []
            else:
                run.append(i)
        parts.append(self.tokenizer.decode(run))
        return "".join(parts)

    def before_train(self, runner) -> None:
        loop = runner.train_loop
        self._show(getattr(loop.dataloader, "dataset", None), "train")
