"""Offline builder of a tiny native InternVL checkpoint (tests and examples).

``build_tiny_internvl`` writes what an ``-hf`` InternVL release holds, at toy size: an
``InternVLForConditionalGeneration`` (InternVL vision tower on 32x32 tiles of 8x8 patches,
pixel shuffle to 4 features per tile, a tiny Qwen2 language model) with random weights, the
given tokenizer with InternVL's image tokens added, and the tiling image processor
(``preprocessor_config.json``). Nothing is downloaded.
"""

from __future__ import annotations

import os

#: InternVL's image tokens, as the tokenizers of its -hf releases name them.
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def tiny_internvl_config(vocab_size: int, image_token_id: int, **text_overrides):
    """An InternVL config small enough to train on a CPU: 32x32 tiles, 4 features each."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=[32, 32],
        patch_size=[8, 8],
    )
    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    text.update(text_overrides)
    return InternVLConfig(
        vision_config=vision.to_dict(),
        text_config=Qwen2Config(**text).to_dict(),
        image_token_id=image_token_id,
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=text["tie_word_embeddings"],
    )


def build_tiny_internvl(
    save_dir: str, tokenizer_path: str, seed: int = 0, max_patches: int = 6, **text_overrides
) -> str:
    """Builds and saves a random tiny InternVL with its tokenizer and processor.

    Args:
        save_dir: output folder (a checkpoint in transformers' InternVL layout).
        tokenizer_path: a tokenizer to start from (e.g. the demo one); the image tokens are
            added to it.
        seed: weights' seed.
        max_patches: the processor's most tiles per image.
        text_overrides: changes to the Qwen2 text config.

    Returns:
        ``save_dir``.
    """
    import torch
    from transformers import AutoTokenizer, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    from xtuner.dataset.internvl_dataset import IMAGENET_MEAN, IMAGENET_STD

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, extra_special_tokens=IMAGE_TOKENS)
    config = tiny_internvl_config(
        len(tokenizer), tokenizer.context_image_token_id, **text_overrides
    )
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    config.text_config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    os.makedirs(save_dir, exist_ok=True)
    model.save_pretrained(save_dir)
    image_processor = GotOcr2ImageProcessorPil(
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_patches,
        size={"height": 32, "width": 32},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    # (InternVLProcessor itself needs a video processor, i.e. torchvision: the image
    # processor and the tokenizer are saved as its parts.)
    image_processor.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return save_dir


#: image sizes of the demo data: one tile, a 2x1 grid and a 1x2 grid (+ thumbnails).
DEMO_IMAGE_SIZES = {"square": (32, 32), "wide": (64, 32), "tall": (32, 64)}


def write_internvl_data(root: str, repeat: int = 1) -> dict[str, str]:
    """Draws coloured shapes at several aspect ratios and writes LLaVA-format instructions
    about them (``data.jsonl``), with text-only samples mixed in.

    Args:
        root: output folder (``images/`` and ``data.jsonl`` are written there).
        repeat: how many times the records are written.

    Returns:
        Paths: ``image_folder``, ``data``.
    """
    import json

    from .llava import COLORS, SHAPES, draw_shape

    image_folder = os.path.join(root, "images")
    os.makedirs(image_folder, exist_ok=True)
    records = []
    sizes = list(DEMO_IMAGE_SIZES.items())
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES):
        layout, size = sizes[i % len(sizes)]
        image = f"{color}_{shape}_{layout}.png"
        draw_shape(color, shape, size).save(os.path.join(image_folder, image))
        question = "<image>\nWhat colour is the shape?"
        records.append(
            {
                "id": f"img{i}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": f"It is {color}."},
                ],
            }
        )
    for color in COLORS:
        records.append(
            {
                "id": f"text_{color}",
                "conversations": [
                    {"from": "human", "value": f"Is {color} a colour?"},
                    {"from": "gpt", "value": "Yes."},
                ],
            }
        )
    path = os.path.join(root, "data.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(repeat):
            for record in records:
                f.write(json.dumps(record) + "\n")
    return {"image_folder": image_folder, "data": path}
