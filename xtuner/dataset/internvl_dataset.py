"""``InternVL_V1_5_Dataset``: LLaVA-format conversations for InternVL, images tiled.

Records are LLaVA's (see :mod:`xtuner.dataset.llava`): ``{"image": "a.jpg", "conversations":
[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}]}``, read
from one or more files, each with its image folder and a repeat factor. The text goes
through the prompt template once, when the data set is built; the images are read when a
sample is drawn:

1. dynamic resolution: each image is resized to the grid of ``image_size`` tiles (at least
   ``min_dynamic_patch``, at most ``max_dynamic_patch`` tiles) whose aspect ratio is closest
   to the image's, and cut into those tiles; with ``use_thumbnail`` and more than one tile,
   the whole image resized to one tile is added last (transformers' ``GotOcr2`` image
   processor, as InternVL's own processor does);
2. each ``<image>`` of the text becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tiles x tokens per
   tile) + ``</img>``, where tokens per tile = ``(image_size / patch_size)^2 *
   downsample_ratio^2`` (pixel shuffle folds 2x2 patch features into one); labels are
   ``IGNORE_INDEX`` on all of them;
3. a sample longer than ``max_length`` is cut there, never inside an image: an image that
   does not fit is dropped with the rest of the text after it.

Tiling settings default to the checkpoint's (its ``preprocessor_config.json``, else InternVL's
defaults: 1 to 12 tiles of the vision tower's image size, with a thumbnail).
"""

from __future__ import annotations

import json
import os.path as osp
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from xtuner.utils.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

from .llava import LLaVADataset, _image_list

#: the image tokens of InternVL's tokenizers (used when the tokenizer does not name them).
IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN = "<img>", "<IMG_CONTEXT>", "</img>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _json(path: str) -> dict:
    if not osp.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class ImageTiler:
    """Cuts an image into InternVL's dynamic-resolution tiles, ``[n, 3, S, S]``.

    Args:
        image_size: side ``S`` of a tile.
        min_dynamic_patch: fewest tiles of the grid.
        max_dynamic_patch: most tiles of the grid.
        use_thumbnail: add the whole image as one more tile when the grid has several.
        image_mean: normalisation mean.
        image_std: normalisation std.
    """

    def __init__(
        self,
        image_size: int,
        min_dynamic_patch: int = 1,
        max_dynamic_patch: int = 12,
        use_thumbnail: bool = True,
        image_mean: tuple[float, ...] = IMAGENET_MEAN,
        image_std: tuple[float, ...] = IMAGENET_STD,
    ):
        # The PIL backend: no torchvision needed, and PIL's bicubic resize as InternVL's own.
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            GotOcr2ImageProcessorPil,
        )

        if not 1 <= min_dynamic_patch <= max_dynamic_patch:
            raise ValueError(
                f"min_dynamic_patch={min_dynamic_patch} and max_dynamic_patch="
                f"{max_dynamic_patch}: need 1 <= min_dynamic_patch <= max_dynamic_patch"
            )
        self.image_size = image_size
        self.use_thumbnail = use_thumbnail
        self.processor = GotOcr2ImageProcessorPil(
            crop_to_patches=True,
            min_patches=min_dynamic_patch,
            max_patches=max_dynamic_patch,
            size={"height": image_size, "width": image_size},
            image_mean=list(image_mean),
            image_std=list(image_std),
        )

    def __call__(self, image) -> torch.Tensor:
        tiles = self.processor(images=image, return_tensors="pt")["pixel_values"]
        if not self.use_thumbnail and tiles.shape[0] > 1:
            tiles = tiles[:-1]  # the processor always appends the thumbnail last
        return tiles


class InternVLImageTokens:
    """How a checkpoint's images become tiles and tokens (used for training and chat).

    Args:
        model_path: the checkpoint folder (its config and ``preprocessor_config.json``).
        tokenizer: its tokenizer (the image tokens' ids are read from it).
        min_dynamic_patch: fewest tiles per image (default: the checkpoint's, else 1).
        max_dynamic_patch: most tiles per image (default: the checkpoint's, else 12).
        use_thumbnail: add a thumbnail tile to multi-tile images (default True).
        image_size: tile side (default: the checkpoint's, else the vision tower's).

    Raises:
        ValueError: the tokenizer lacks the image tokens or does not fit the checkpoint.
    """

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        min_dynamic_patch: int | None = None,
        max_dynamic_patch: int | None = None,
        use_thumbnail: bool | None = None,
        image_size: int | None = None,
    ):
        geometry = _vision_geometry(model_path)
        processor_cfg = _json(osp.join(str(model_path), "preprocessor_config.json"))
        size = (
            image_size or (processor_cfg.get("size") or {}).get("height") or geometry["image_size"]
        )
        self.tiler = ImageTiler(
            size,
            min_dynamic_patch or processor_cfg.get("min_patches", 1),
            max_dynamic_patch or processor_cfg.get("max_patches", 12),
            True if use_thumbnail is None else use_thumbnail,
            tuple(processor_cfg.get("image_mean", IMAGENET_MEAN)),
            tuple(processor_cfg.get("image_std", IMAGENET_STD)),
        )
        #: image-context tokens per tile.
        self.tokens_per_tile = int(
            (size // geometry["patch_size"]) ** 2 * geometry["downsample_ratio"] ** 2
        )
        names = [
            getattr(tokenizer, "start_image_token", None) or IMG_START_TOKEN,
            getattr(tokenizer, "context_image_token", None) or IMG_CONTEXT_TOKEN,
            getattr(tokenizer, "end_image_token", None) or IMG_END_TOKEN,
        ]
        vocab = tokenizer.get_vocab()
        missing = [n for n in names if n not in vocab]
        if missing:
            raise ValueError(
                f"the tokenizer has no {missing} token(s): InternVL writes each image as "
                f"{names[0]}{names[1]}...{names[2]}; use the checkpoint's own tokenizer"
            )
        self.start_id, self.context_id, self.end_id = (vocab[n] for n in names)
        token_id = geometry["image_token_id"]
        if token_id is not None and self.context_id != token_id:
            raise ValueError(
                f"the tokenizer's {names[1]} is id {self.context_id}, but the model's "
                f"config.image_token_id is {token_id}: the tokenizer does not "
                "belong to this checkpoint"
            )

    def expand(
        self,
        input_ids: list[int],
        labels: list[int],
        images: list[torch.Tensor],
        max_length: int | None = None,
    ) -> tuple[list[int], list[int], list[torch.Tensor]]:
        """Writes each image token as its tile tokens, then cuts at ``max_length``.

        Args:
            input_ids: the text's ids, ``IMAGE_TOKEN_INDEX`` per image.
            labels: the text's labels.
            images: the tiles ``[n_i, 3, S, S]`` of each image token, in order.
            max_length: the most tokens kept (None: all).

        Returns:
            ``(input_ids, labels, images kept)``: an image that would be cut is dropped,
            with everything after it.
        """
        ids_out: list[int] = []
        labels_out: list[int] = []
        starts = []
        for token, label in zip(input_ids, labels):
            if token != IMAGE_TOKEN_INDEX:
                ids_out.append(token)
                labels_out.append(label)
                continue
            n = images[len(starts)].shape[0] * self.tokens_per_tile
            starts.append(len(ids_out))
            block = [self.start_id, *[self.context_id] * n, self.end_id]
            ids_out += block
            labels_out += [IGNORE_INDEX] * len(block)
        cut = len(ids_out) if max_length is None else max_length
        kept = len(starts)
        for j, start in enumerate(starts):
            end = start + images[j].shape[0] * self.tokens_per_tile + 2
            if end > cut:
                cut, kept = min(cut, start), j
                break
        return ids_out[:cut], labels_out[:cut], images[:kept]


class _TiledRecords(LLaVADataset):
    """One data file: LLaVA records whose images load as InternVL tiles."""

    def __init__(self, tiler: ImageTiler, **kwargs):
        super().__init__(image_processor=tiler.processor, **kwargs)
        self.tiler = tiler

    def load_image(self, file: str, index: int) -> torch.Tensor:
        return self.tiler(self.open_image(file, index))


class InternVL_V1_5_Dataset(Dataset):  # noqa: N801 (the XTuner 0.x name)
    """InternVL conversations with tiled images (see the module docstring).

    Args:
        model_path: the checkpoint folder (its tokenizer, config and image settings).
        template: the prompt template (e.g. ``PROMPT_TEMPLATE.internlm2_chat``).
        data_paths: a JSON / JSON Lines file of LLaVA records, or a list of them.
        image_folders: the folder the ``image`` paths of each file are relative to.
        repeat_times: how often each file's records are used (a fraction: a seeded random
            part of them).
        max_length: samples are cut to this many tokens, image tokens included.
        min_dynamic_patch: fewest tiles per image (default: the checkpoint's, else 1).
        max_dynamic_patch: most tiles per image (default: the checkpoint's, else 12).
        use_thumbnail: add a thumbnail tile to multi-tile images (default True).
        image_size: tile side (default: the vision tower's image size).
        tokenizer: a tokenizer or its config (default: the checkpoint's).
        dataset_map_fn: record -> conversation (default ``llava_map_fn``).
        seed: the seed of fractional repeats.

    A sample holds ``input_ids``, ``labels`` and ``pixel_values`` ``[n_tiles, 3, S, S]`` (one
    zero tile for a text-only sample, a placeholder the model skips).
    """

    def __init__(
        self,
        model_path: str,
        template: Any,
        data_paths: str | list[str],
        image_folders: str | list[str] | None = None,
        repeat_times: float | list[float] = 1,
        max_length: int = 8192,
        min_dynamic_patch: int | None = None,
        max_dynamic_patch: int | None = None,
        use_thumbnail: bool | None = None,
        image_size: int | None = None,
        tokenizer: Any = None,
        dataset_map_fn: Any = None,
        seed: int = 0,
    ):
        from transformers import AutoTokenizer

        from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
        from xtuner.registry import BUILDER

        super().__init__()
        data_paths, image_folders, repeat_times = _per_file(data_paths, image_folders, repeat_times)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        elif isinstance(tokenizer, dict):
            tokenizer = BUILDER.build(tokenizer)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_tokens = InternVLImageTokens(
            model_path, tokenizer, min_dynamic_patch, max_dynamic_patch, use_thumbnail, image_size
        )
        self.tiler = self.image_tokens.tiler
        template_fn = dict(type=template_map_fn_factory, template=template)
        self.parts = [
            _TiledRecords(
                self.tiler,
                image_folder=folder or "",
                data_path=path,
                tokenizer=tokenizer,
                dataset_map_fn=dataset_map_fn or llava_map_fn,
                template_map_fn=template_fn,
                max_length=max_length,
            )
            for path, folder in zip(data_paths, image_folders)
        ]
        rng = np.random.default_rng(seed)
        self._index = [
            (p, int(i))
            for p, (part, times) in enumerate(zip(self.parts, repeat_times))
            for i in _repeated(len(part), times, rng)
        ]

    # lengths -------------------------------------------------------------------------------
    @property
    def modality_length(self) -> list[int]:
        """Estimated length of each sample (images at their most tiles), negative without
        an image (for ``LengthGroupedSampler(length_property='modality_length')``)."""
        tokens_per_tile = self.image_tokens.tokens_per_tile
        per_image = tokens_per_tile * (self.tiler.processor.max_patches + self.tiler.use_thumbnail)
        per_image += 2
        text = [part.modality_length for part in self.parts]
        tokens = [part._image_tokens for part in self.parts]
        out = []
        for p, i in self._index:
            n = text[p][i]
            out.append(n + int(tokens[p][i]) * (per_image - 1) if n > 0 else n)
        return out

    @property
    def length(self) -> list[int]:
        return [abs(n) for n in self.modality_length]

    def __len__(self) -> int:
        return len(self._index)

    # samples -------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict:
        p, i = self._index[index]
        part = self.parts[p]
        sample = dict(part.text_data[i])
        k = int(part._image_tokens[i])
        images = [part.load_image(f, i) for f in _image_list(sample.get("image"))[:k]]
        ids, labels, kept = self.image_tokens.expand(
            sample["input_ids"], sample["labels"], images, self.max_length
        )
        out = {"input_ids": ids, "labels": labels}
        if kept:
            out["pixel_values"] = torch.cat(kept)
        else:
            size = self.tiler.image_size
            out["pixel_values"] = torch.zeros(1, 3, size, size)
        return out


def _per_file(data_paths, image_folders, repeat_times) -> tuple[list, list, list]:
    paths = [data_paths] if isinstance(data_paths, str) else list(data_paths)
    folders = (
        [image_folders] * len(paths)
        if image_folders is None or isinstance(image_folders, str)
        else list(image_folders)
    )
    times = (
        [repeat_times] * len(paths)
        if isinstance(repeat_times, (int, float))
        else list(repeat_times)
    )
    if not len(paths) == len(folders) == len(times):
        raise ValueError(
            f"InternVL_V1_5_Dataset: {len(paths)} data_paths, {len(folders)} image_folders "
            f"and {len(times)} repeat_times: give one folder and one repeat per data file"
        )
    bad = [t for t in times if not t > 0]
    if bad:
        raise ValueError(f"InternVL_V1_5_Dataset: repeat_times must be > 0, got {bad}")
    return paths, folders, times


def _vision_geometry(model_path: str) -> dict:
    """Tile side, patch side, pixel-shuffle ratio and image-context id (None: the model
    takes it from the tokenizer) of an -hf or a remote-code checkpoint.

    A remote-code config (``InternVLChatConfig``) is read as JSON, so no code runs here.
    """
    raw = _json(osp.join(str(model_path), "config.json"))
    if raw.get("auto_map") and raw.get("model_type") != "internvl":
        vision = raw.get("vision_config") or {}
        return {
            "image_size": _side(raw.get("force_image_size") or vision["image_size"]),
            "patch_size": _side(vision["patch_size"]),
            "downsample_ratio": raw["downsample_ratio"],
            "image_token_id": None,
        }
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    return {
        "image_size": _side(config.vision_config.image_size),
        "patch_size": _side(config.vision_config.patch_size),
        "downsample_ratio": config.downsample_ratio,
        "image_token_id": config.image_token_id,
    }


def _side(value: Any) -> int:
    """The first side of an ``int`` or ``(h, w)`` size."""
    return value if isinstance(value, int) else value[0]


def _repeated(n: int, times: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` records used ``times`` times (the fraction a random subset)."""
    whole = int(times)
    extra = rng.permutation(n)[: round((times - whole) * n)]
    return np.concatenate([np.tile(np.arange(n), whole), np.sort(extra)])
