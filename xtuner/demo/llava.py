"""Offline builders for the tiny LLaVA demo and tests: a tiny CLIP vision model, its image
processor, synthetic images drawn with PIL and LLaVA-format data files.

Nothing is downloaded: the vision model is built from a config with random weights and saved
with ``save_pretrained``; the images are coloured shapes whose captions name the colour and
the shape, so the demo has something learnable. The demo data (images and JSONL files) is
bundled under ``xtuner/demo/data/llava`` (written by :func:`write_llava_data`); the bundled
configs name it through the constants below, and the models through :func:`demo_clip`,
:func:`demo_image_processor` (and :func:`xtuner.demo.demo_llm`), because mmengine parses
configs lazily: nothing imported can run while a config file is read.
"""

from __future__ import annotations

import json
import os
import os.path as osp

from . import DEMO_DIR, demo_dir

LLAVA_DEMO_DATA = osp.join(DEMO_DIR, "data", "llava")
LLAVA_DEMO_IMAGES = osp.join(LLAVA_DEMO_DATA, "images")
LLAVA_DEMO_PRETRAIN = osp.join(LLAVA_DEMO_DATA, "pretrain.jsonl")
LLAVA_DEMO_FINETUNE = osp.join(LLAVA_DEMO_DATA, "finetune.jsonl")
LLAVA_DEMO_EVAL_IMAGE = osp.join(LLAVA_DEMO_IMAGES, "red_circle.png")

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("square", "circle", "triangle")


def tiny_clip_vision_config(**overrides):
    """A CLIP vision config small enough to train on a CPU: 32x32 images, 16 patches."""
    from transformers import CLIPVisionConfig

    kwargs = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    kwargs.update(overrides)
    return CLIPVisionConfig(**kwargs)


def build_tiny_clip(save_dir: str, seed: int = 0, **overrides):
    """Builds a random tiny ``CLIPVisionModel`` and its image processor, saves both.

    Returns:
        ``(model, image_processor)``.
    """
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(tiny_clip_vision_config(**overrides))
    size = model.config.image_size
    processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    os.makedirs(save_dir, exist_ok=True)
    model.save_pretrained(save_dir)
    processor.save_pretrained(save_dir)
    return model, processor


def draw_shape(color: str, shape: str, size: tuple[int, int] = (48, 40)):
    """A PIL image of a coloured shape on white."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (width // 6, height // 6, width - width // 6, height - height // 6)
    fill = COLORS[color]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill)
    return image


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def write_llava_data(root: str) -> dict[str, str]:
    """Draws the images and writes the pretrain (captions) and finetune (instructions) data.

    The finetune data mixes image conversations (two turns) and text-only samples.

    Returns:
        Paths: ``image_folder``, ``pretrain_data``, ``finetune_data``.
    """
    image_folder = osp.join(root, "images")
    os.makedirs(image_folder, exist_ok=True)
    items = [(c, s) for c in COLORS for s in SHAPES]
    for color, shape in items:
        draw_shape(color, shape).save(osp.join(image_folder, f"{color}_{shape}.png"))
    pretrain, finetune = [], []
    for i, (color, shape) in enumerate(items):
        image = f"{color}_{shape}.png"
        pretrain.append(
            {
                "id": i,
                "image": image,
                "conversations": [
                    {"from": "human", "value": "Describe the image.\n<image>"},
                    {"from": "gpt", "value": f"A {color} {shape}."},
                ],
            }
        )
        finetune.append(
            {
                "id": f"ft{i}",
                "image": image,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": f"It is {color}."},
                    {"from": "human", "value": "And which shape is it?"},
                    {"from": "gpt", "value": f"A {shape}."},
                ],
            }
        )
    for color in COLORS:
        finetune.append(
            {
                "id": f"text_{color}",
                "conversations": [
                    {"from": "human", "value": f"Is {color} a colour?"},
                    {"from": "gpt", "value": "Yes."},
                ],
            }
        )
    paths = {
        "image_folder": image_folder,
        "pretrain_data": osp.join(root, "pretrain.jsonl"),
        "finetune_data": osp.join(root, "finetune.jsonl"),
    }
    _write_jsonl(paths["pretrain_data"], pretrain)
    _write_jsonl(paths["finetune_data"], finetune)
    return paths


def _clip_dir() -> str:
    path = osp.join(demo_dir(), "clip")
    if not osp.exists(osp.join(path, "config.json")):
        build_tiny_clip(path)
    return path


def demo_clip():
    """The demo's tiny CLIP vision model, built offline on first use under
    ``$XTUNER_DEMO_DIR``; for ``visual_encoder=dict(type=demo_clip)``."""
    from transformers import CLIPVisionModel

    return CLIPVisionModel.from_pretrained(_clip_dir())


def demo_image_processor():
    """The image processor saved with :func:`demo_clip` (32x32 crops)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor.from_pretrained(_clip_dir())
