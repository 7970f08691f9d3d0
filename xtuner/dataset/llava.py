"""``LLaVADataset``: image-text conversations in the LLaVA format, tokenised once.

Records (JSON list or JSON Lines) look like::

    {"id": "0001", "image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is shown?"},
                       {"from": "gpt", "value": "A cat on a sofa."}]}

``image`` may also be a list of files (one per ``<image>`` token, in order) or absent
(a text-only sample). The text goes through :func:`process_hf_dataset` (map fn, template,
tokenisation with ``<image>`` -> ``IMAGE_TOKEN_INDEX``, no packing); images are read when a
sample is drawn.

Bad input:

- a sample with more ``<image>`` tokens than images, or whose image file does not exist, is
  skipped when the data set is built, with one warning counting each kind and naming the
  first few samples;
- a sample with more images than ``<image>`` tokens (e.g. a token cut off by ``max_length``)
  is kept and uses its first images only (counted in the same warning);
- an image file that exists but cannot be decoded raises a ``ValueError`` naming the sample
  and the file when the sample is drawn (decoding every image up front would be too slow).
"""

from __future__ import annotations

import logging
import os.path as osp
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset as HFDataset
from datasets import load_from_disk
from mmengine.config import ConfigDict
from mmengine.logging import print_log
from torch.utils.data import Dataset

from xtuner.registry import BUILDER
from xtuner.utils.constants import IMAGE_TOKEN_INDEX

from .huggingface import process_hf_dataset
from .utils import read_json_records

#: how many offending samples a warning names per kind of problem.
_SHOWN = 5


def expand2square(image, background: tuple[int, ...]):
    """Pads a PIL image to a square with ``background``, keeping it centred."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def load_llava_records(path: str) -> list[dict]:
    """Reads LLaVA records from a JSON or JSON Lines file.

    ``id`` becomes a string and ``image`` a list of file names (empty for text-only records),
    so that records of mixed types make one Arrow table.

    Raises:
        ValueError: a record does not parse, or is not an object.
    """
    records = []
    for i, (line, record, error) in enumerate(read_json_records(path)):
        where = f"{path}:{line}" if line is not None else f"{path} record {i}"
        if error is not None:
            raise ValueError(f"{where}: {error}")
        if not isinstance(record, dict):
            raise ValueError(
                f"{where}: a record must be a JSON object, got {type(record).__name__}"
            )
        record = dict(record)
        if "id" in record:
            record["id"] = str(record["id"])
        image = record.get("image")
        if image is None:
            record["image"] = []
        elif isinstance(image, str):
            record["image"] = [image]
        elif isinstance(image, list) and all(isinstance(x, str) for x in image):
            record["image"] = image
        else:
            raise ValueError(f"{where}: 'image' must be a file name or a list of them")
        records.append(record)
    return records


def _image_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _image_token_counts(text_data: HFDataset) -> np.ndarray:
    """Number of ``IMAGE_TOKEN_INDEX`` in each row's ``input_ids`` (vectorised with Arrow)."""
    column = text_data.with_format("arrow")["input_ids"]
    counts = np.zeros(len(text_data), dtype=np.int64)
    for offset, chunk in _chunks_with_offsets(column):
        flat = pc.list_flatten(chunk)
        rows = pc.list_parent_indices(chunk).to_numpy()
        is_image = pc.equal(flat, IMAGE_TOKEN_INDEX).to_numpy(zero_copy_only=False)
        counts += np.bincount(rows[is_image] + offset, minlength=len(counts))
    return counts


def _chunks_with_offsets(column):
    offset = 0
    for chunk in column.chunks:
        yield offset, chunk
        offset += len(chunk)


class LLaVADataset(Dataset):
    """LLaVA conversations with their images (see the module docstring for the format).

    Args:
        image_folder: folder the ``image`` paths are relative to.
        image_processor: an HF image processor (e.g. ``CLIPImageProcessor``) or its config.
        data_path: JSON / JSON Lines file of records.
        tokenizer: tokenizer (or its config) for the text.
        offline_processed_text_folder: a folder saved with ``save_to_disk`` holding
            already tokenised text (``input_ids``, ``labels``, ``image``); replaces
            ``data_path``.
        max_dataset_length: keep a seeded random subset of this many records.
        dataset_map_fn: record -> conversation (``llava_map_fn``, ``llava_image_only_map_fn``).
        template_map_fn: the prompt template (config).
        max_length: samples are truncated to this many text tokens.
        pad_image_to_square: pad images to a square with the processor's mean colour before
            processing (instead of letting the processor crop them).

    Each sample holds ``input_ids``, ``labels`` and ``pixel_values``: ``[C, H, W]`` for one
    image, ``[n, C, H, W]`` for several, zeros ``[C, H, W]`` for a text-only sample (a
    placeholder the model skips). ``modality_length`` gives text lengths, negative for
    text-only samples (for ``LengthGroupedSampler(length_property='modality_length')``).
    """

    def __init__(
        self,
        image_folder: str,
        image_processor: Any,
        data_path: str | None = None,
        tokenizer: Any = None,
        offline_processed_text_folder: str | None = None,
        max_dataset_length: int | None = None,
        dataset_map_fn: Any = None,
        template_map_fn: Any = None,
        max_length: int = 2048,
        pad_image_to_square: bool = False,
    ):
        super().__init__()
        if offline_processed_text_folder is not None:
            if data_path is not None:
                print_log(
                    "LLaVADataset: both offline_processed_text_folder and data_path are "
                    "given; the offline folder is used",
                    logger="current",
                    level=logging.WARNING,
                )
            text_data = load_from_disk(offline_processed_text_folder)
        elif data_path is not None:
            text_data = process_hf_dataset(
                dataset=HFDataset.from_list(self.load_records(data_path)),
                tokenizer=tokenizer,
                max_length=max_length,
                dataset_map_fn=dataset_map_fn,
                template_map_fn=template_map_fn,
                split="train",
                max_dataset_length=max_dataset_length,
                remove_unused_columns=False,
                pack_to_max_length=False,
                with_image_token=True,
            )
        else:
            raise ValueError("LLaVADataset needs data_path or offline_processed_text_folder")
        self.image_folder = image_folder
        if isinstance(image_processor, (dict, ConfigDict)):
            image_processor = BUILDER.build(image_processor)
        self.image_processor = image_processor
        self.pad_image_to_square = pad_image_to_square
        self.text_data, self._image_tokens = self._drop_unusable(
            text_data, data_path or offline_processed_text_folder
        )

    # building ------------------------------------------------------------------------------
    def load_records(self, data_path: str) -> list[dict]:
        """The LLaVA records of ``data_path``; data sets of other layouts (RefCOCO) convert
        theirs here."""
        return load_llava_records(data_path)

    def _drop_unusable(self, text_data: HFDataset, source: str) -> tuple[HFDataset, np.ndarray]:
        """Skips samples whose images are missing (see the module docstring), with a warning.

        Returns:
            The usable samples and the number of image tokens of each.
        """
        tokens = _image_token_counts(text_data)
        images = (
            [_image_list(v) for v in text_data["image"]]
            if "image" in text_data.column_names
            else [[] for _ in range(len(text_data))]
        )
        names = text_data["id"] if "id" in text_data.column_names else range(len(text_data))
        problems: dict[str, list] = {"few": [], "missing": [], "extra": []}
        exists: dict[str, bool] = {}  # images are often shared between samples

        def found(path: str) -> bool:
            if path not in exists:
                exists[path] = osp.isfile(path)
            return exists[path]

        keep = []
        for i, (k, files, name) in enumerate(zip(tokens.tolist(), images, names)):
            if k > len(files):
                problems["few"].append(name)
                continue
            paths = [osp.join(self.image_folder, f) for f in files[:k]]
            if not all(found(p) for p in paths):
                problems["missing"].append(name)
                continue
            if len(files) > k:
                problems["extra"].append(name)
            keep.append(i)
        #: samples (their ``id``, else their index) skipped ("few", "missing") or
        #: using only some of their images ("extra").
        self.problems = problems
        self._warn(problems, source)
        if len(keep) == len(text_data):
            return text_data, tokens
        if not keep:
            raise ValueError(
                f"LLaVADataset: no usable sample in {source} (image_folder={self.image_folder!r})"
            )
        return text_data.select(keep), tokens[keep]

    def _warn(self, problems: dict[str, list], source: str) -> None:
        what = {
            "few": "skipped: more '<image>' tokens than images",
            "missing": f"skipped: image file not found under {self.image_folder!r}",
            "extra": "kept: more images than '<image>' tokens, the extra images are unused",
        }
        lines = [
            f"  {len(rows)} {what[kind]} (samples {rows[:_SHOWN]}"
            + (", ...)" if len(rows) > _SHOWN else ")")
            for kind, rows in problems.items()
            if rows
        ]
        if lines:
            print_log(
                f"LLaVADataset {source}:\n" + "\n".join(lines),
                logger="current",
                level=logging.WARNING,
            )

    # lengths -------------------------------------------------------------------------------
    @property
    def length(self) -> list[int]:
        """Text length of each sample."""
        return [abs(n) for n in self.modality_length]

    @property
    def modality_length(self) -> list[int]:
        """Text length of each sample, negative for samples without an image."""
        column = self.text_data.with_format("arrow")["input_ids"]
        lengths = pc.list_value_length(column).to_numpy()
        return np.where(self._image_tokens > 0, lengths, -lengths).tolist()

    def __len__(self) -> int:
        return len(self.text_data)

    # samples -------------------------------------------------------------------------------
    def _crop_size(self) -> tuple[int, int]:
        size = getattr(self.image_processor, "crop_size", None) or self.image_processor.size
        return size["height"], size["width"]

    def open_image(self, file: str, index: int):
        """Reads one image of sample ``index`` as an RGB PIL image (a clear error if broken)."""
        from PIL import Image

        path = osp.join(self.image_folder, file)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(
                f"{type(self).__name__} sample {index}: cannot decode image {path} ({e}); fix "
                "or remove it, or drop the record from the data"
            ) from e

    def load_image(self, file: str, index: int) -> torch.Tensor:
        """Reads, (pads,) and processes one image to ``[C, H, W]``."""
        image = self.open_image(file, index)
        if self.pad_image_to_square:
            mean = self.image_processor.image_mean
            image = expand2square(image, tuple(int(x * 255) for x in mean))
        return self.image_processor.preprocess(image, return_tensors="pt")["pixel_values"][0]

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.text_data[index])
        k = int(self._image_tokens[index])
        files = _image_list(sample.get("image"))[:k]
        if not files:
            sample["pixel_values"] = torch.zeros(3, *self._crop_size())
        elif len(files) == 1:
            sample["pixel_values"] = self.load_image(files[0], index)
        else:
            sample["pixel_values"] = torch.stack([self.load_image(f, index) for f in files])
        return sample
