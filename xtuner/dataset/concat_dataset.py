"""``ConcatDataset``: several data sets (or their configs) read as one."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import ConcatDataset as TorchConcatDataset

from xtuner.registry import BUILDER

from .utils import is_config


class ConcatDataset(TorchConcatDataset):
    """Concatenation of data sets; config entries are built with ``BUILDER``.

    ``LengthGroupedSampler`` reads the lengths of every part.

    Args:
        datasets: data sets or configs that build them.
    """

    def __init__(self, datasets: Sequence) -> None:
        if not datasets:
            raise ValueError("ConcatDataset needs at least one data set")
        built = [BUILDER.build(d) if is_config(d) else d for d in datasets]
        super().__init__(built)

    def __repr__(self) -> str:
        parts = ",\n".join(f"  {d!r}" for d in self.datasets)
        return f"ConcatDataset(\n{parts}\n)"
