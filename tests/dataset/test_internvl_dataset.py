"""InternVL_V1_5_Dataset: tiles and thumbnail, the image-token layout, cuts, file options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from xtuner.dataset import InternVL_V1_5_Dataset
from xtuner.dataset.internvl_dataset import IMAGENET_MEAN, IMAGENET_STD, ImageTiler
from xtuner.utils import PROMPT_TEMPLATE
from xtuner.utils.constants import IGNORE_INDEX

N = 4  # image-context tokens per 32x32 tile of the tiny model


def gradient(width: int, height: int) -> Image.Image:
    """An image whose every pixel differs, so each tile's content is checkable."""
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    rgb = np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2).astype(np.uint8)
    return Image.fromarray(rgb)


def normalised(image: Image.Image) -> torch.Tensor:
    """The tile a resized PIL image gives, normalised by hand."""
    pixels = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    mean, std = (
        torch.tensor(IMAGENET_MEAN)[:, None, None],
        torch.tensor(IMAGENET_STD)[:, None, None],
    )
    return (pixels - mean) / std


@pytest.mark.parametrize(
    ("size", "max_tiles", "grid"),
    [
        ((64, 32), 6, (2, 1)),  # 2:1 -> two tiles side by side, + thumbnail
        ((32, 96), 6, (1, 3)),  # 1:3 -> three tiles stacked, + thumbnail
        ((40, 40), 6, (1, 1)),  # square -> one tile, no thumbnail
        ((96, 32), 2, (2, 1)),  # 3:1 with at most 2 tiles -> the closest, 2:1
        ((64, 64), 6, (2, 2)),  # same aspect ratio diff for 1x1 and 2x2: the image is big
        # enough (area > half of 2x2 tiles), so the grid with more tiles wins
    ],
)
def test_tiles_and_thumbnail_match_a_hand_computed_grid(size, max_tiles, grid):
    image = gradient(*size)
    tiler = ImageTiler(32, 1, max_tiles, use_thumbnail=True)
    tiles = tiler(image)
    cols, rows = grid
    expected = [
        normalised(
            image.resize((32 * cols, 32 * rows), Image.BICUBIC).crop(
                (32 * c, 32 * r, 32 * (c + 1), 32 * (r + 1))
            )
        )
        for r in range(rows)
        for c in range(cols)
    ]
    if cols * rows > 1:
        expected.append(normalised(image.resize((32, 32), Image.BICUBIC)))
    assert tiles.shape == (len(expected), 3, 32, 32)
    torch.testing.assert_close(tiles, torch.stack(expected), atol=1e-5, rtol=0)
    without = ImageTiler(32, 1, max_tiles, use_thumbnail=False)(image)
    assert without.shape[0] == cols * rows


def write(tmp_path, records) -> tuple[str, str]:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    gradient(64, 32).save(folder / "wide.png")
    gradient(32, 32).save(folder / "square.png")
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path), str(folder)


RECORDS = [
    {
        "id": "wide",
        "image": "wide.png",
        "conversations": [
            {"from": "human", "value": "What is <image> this?"},
            {"from": "gpt", "value": "A gradient."},
        ],
    },
    {
        "id": "text",
        "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Yes."}],
    },
    {
        "id": "square",
        "image": "square.png",
        "conversations": [
            {"from": "human", "value": "<image>\nAnd this?"},
            {"from": "gpt", "value": "Also."},
        ],
    },
]


def test_encoded_samples_equal_a_hand_built_reference(internvl_path, tmp_path):
    path, folder = write(tmp_path, RECORDS)
    template = PROMPT_TEMPLATE.internlm2_chat
    ds = InternVL_V1_5_Dataset(internvl_path, template, path, folder, max_length=256)
    tok = AutoTokenizer.from_pretrained(internvl_path)
    s, c, e = tok.start_image_token_id, tok.context_image_token_id, tok.end_image_token_id

    def reference(question: str, answer: str, tiles: int | None):
        # The template written out by hand; the image block at the start of the question.
        before = "<|im_start|>user\n"
        after = f"{question}<|im_end|>\n<|im_start|>assistant\n"
        prompt = [tok.bos_token_id, *tok.encode(before, add_special_tokens=False)]
        if tiles is not None:
            prompt += [
                s,
                *[c] * (tiles * N),
                e,
                *tok.encode("\n" + after, add_special_tokens=False),
            ]
        else:
            prompt = [tok.bos_token_id, *tok.encode(before + after, add_special_tokens=False)]
        # The template's SUFFIX ends the reply (SUFFIX_AS_EOS: no EOS); its SEP is no target.
        reply = tok.encode(f"{answer}<|im_end|>", add_special_tokens=False)
        sep = tok.encode("\n", add_special_tokens=False)
        return prompt + reply + sep, [IGNORE_INDEX] * len(prompt) + reply + [IGNORE_INDEX] * len(
            sep
        )

    # (llava_map_fn moves a single <image> to the start of its message: "What is  this?")
    cases = [
        ("What is  this?", "A gradient.", 3),
        ("Hello", "Yes.", None),
        ("And this?", "Also.", 1),
    ]
    assert len(ds) == 3
    for i, (question, answer, tiles) in enumerate(cases):
        sample = ds[i]
        ids, labels = reference(question, answer, tiles)
        assert sample["input_ids"] == ids, i
        assert sample["labels"] == labels, i
        assert sample["pixel_values"].shape == (tiles or 1, 3, 32, 32)
        if tiles is None:
            assert not sample["pixel_values"].any()  # the placeholder the model skips
    assert ds.modality_length[1] < 0 < ds.modality_length[0]


def test_max_length_never_cuts_inside_an_image(internvl_path, tmp_path):
    # A long reply, so that the text alone, cut at max_length, still has targets.
    # A long reply, so that the text alone, cut at max_length, still has targets; a question
    # of the image alone, so that a cut inside the image can leave the prompt whole.
    record = dict(
        RECORDS[0],
        conversations=[
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": "A gradient. " * 20},
        ],
    )
    path, folder = write(tmp_path, [record])
    full = InternVL_V1_5_Dataset(internvl_path, PROMPT_TEMPLATE.internlm2_chat, path, folder)[0]
    tok = AutoTokenizer.from_pretrained(internvl_path)
    start = full["input_ids"].index(tok.start_image_token_id)
    end = full["input_ids"].index(tok.end_image_token_id) + 1
    # Room for the image: kept, the text after it cut.
    ds = InternVL_V1_5_Dataset(
        internvl_path, PROMPT_TEMPLATE.internlm2_chat, path, folder, max_length=end + 2
    )
    assert ds[0]["input_ids"] == full["input_ids"][: end + 2]
    assert ds[0]["pixel_values"].shape[0] == 3
    # No room: the image and all after it dropped.
    ds = InternVL_V1_5_Dataset(
        internvl_path, PROMPT_TEMPLATE.internlm2_chat, path, folder, max_length=end - 1
    )
    assert ds[0]["input_ids"] == full["input_ids"][:start]
    assert not ds[0]["pixel_values"].any()


def test_several_files_repeats_and_tiling_options(internvl_path, tmp_path):
    path, folder = write(tmp_path, RECORDS)
    ds = InternVL_V1_5_Dataset(
        internvl_path,
        PROMPT_TEMPLATE.internlm2_chat,
        [path, path],
        [folder, folder],
        repeat_times=[2, 1 / 3],
        max_dynamic_patch=1,
    )
    assert len(ds) == 3 * 2 + 1
    assert ds[0]["pixel_values"].shape[0] == 1  # a single tile: no grid, no thumbnail
    with pytest.raises(ValueError, match="2 data_paths, 1 image_folders"):
        InternVL_V1_5_Dataset(
            internvl_path, PROMPT_TEMPLATE.internlm2_chat, [path, path], [folder], repeat_times=1
        )
    with pytest.raises(ValueError, match="min_dynamic_patch=3 and max_dynamic_patch=2"):
        InternVL_V1_5_Dataset(
            internvl_path,
            PROMPT_TEMPLATE.internlm2_chat,
            path,
            folder,
            min_dynamic_patch=3,
            max_dynamic_patch=2,
        )
