"""LLaVADataset: samples, lengths by modality, image padding, bad input, collate into a model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPImageProcessor

from xtuner.dataset.llava import LLaVADataset
from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
from xtuner.demo.llava import draw_shape
from xtuner.utils import PROMPT_TEMPLATE
from xtuner.utils.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX

TEMPLATE = dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.vicuna)


def in_place_map_fn(example: dict) -> dict:
    """Like llava_map_fn but leaves every '<image>' where it is (several images per sample)."""
    msgs = example["conversations"]
    turns = [{"input": q["value"], "output": a["value"]} for q, a in zip(msgs[::2], msgs[1::2])]
    return {"conversation": turns}


@pytest.fixture(autouse=True)
def no_dataset_cache(monkeypatch):
    monkeypatch.setenv("XTUNER_DATASET_CACHE", "none")


@pytest.fixture(scope="module")
def processor():
    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


@pytest.fixture()
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    draw_shape("red", "square").save(images / "a.png")
    draw_shape("blue", "circle").save(images / "b.png")
    (images / "broken.png").write_bytes(b"not an image at all")
    return tmp_path


def chat(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


SINGLE = [
    {"id": 1, "image": "a.png", "conversations": chat("What is it?\n<image>", "A red square.")},
    {"id": 2, "image": "b.png", "conversations": chat("<image>\nAnd this?", "A blue circle.")},
    {"id": "text", "conversations": chat("Say hello.", "Hello.")},
]
GOOD = [
    {"id": 1, "image": "a.png", "conversations": chat("<image>\nWhat is it?", "A red square.")},
    {
        "id": "two",
        "image": ["a.png", "b.png"],
        "conversations": chat("Compare <image> and <image>.", "A square and a circle."),
    },
    {"id": "text", "conversations": chat("Say hello.", "Hello.")},
]


def write(folder, records, name="data.jsonl") -> str:
    path = folder / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return str(path)


def make(folder, tokenizer, processor, records=GOOD, name="data.jsonl", **kwargs) -> LLaVADataset:
    kwargs.setdefault("dataset_map_fn", in_place_map_fn)
    return LLaVADataset(
        image_folder=str(folder / "images"),
        image_processor=processor,
        data_path=write(folder, records, name),
        tokenizer=tokenizer,
        template_map_fn=TEMPLATE,
        max_length=256,
        **kwargs,
    )


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])
def test_samples_and_modality_lengths(folder, tokenizer, processor, name):
    ds = make(folder, tokenizer, processor, name=name)
    assert len(ds) == 3
    one, two, text = ds[0], ds[1], ds[2]
    assert one["pixel_values"].shape == (3, 32, 32)
    assert two["pixel_values"].shape == (2, 3, 32, 32)
    assert not text["pixel_values"].any()  # placeholder
    assert [s["input_ids"].count(IMAGE_TOKEN_INDEX) for s in (one, two, text)] == [1, 2, 0]
    for sample in (one, two):
        at_images = [lab for t, lab in zip(sample["input_ids"], sample["labels"]) if t < 0]
        assert at_images and all(lab == IGNORE_INDEX for lab in at_images)
    lengths = [len(s["input_ids"]) for s in (one, two, text)]
    assert ds.modality_length == [lengths[0], lengths[1], -lengths[2]]
    assert ds.length == lengths
    assert ds.problems == {"few": [], "missing": [], "extra": []}


def test_pad_image_to_square(folder, tokenizer, processor):
    plain = make(folder, tokenizer, processor)[0]["pixel_values"]
    padded = make(folder, tokenizer, processor, pad_image_to_square=True)[0]["pixel_values"]
    # The 48x40 image padded with the processor's mean colour: the top row is ~0 after
    # normalisation; cropped instead, the top row is white background.
    assert padded[:, 0].abs().max() < 0.05
    assert plain[:, 0].abs().min() > 1.0


def test_bad_samples_are_skipped_and_counted(folder, tokenizer, processor):
    records = [
        *GOOD,
        {"id": "lost", "image": "missing.png", "conversations": chat("<image>\nHi", "Hi.")},
        {"id": "few", "image": "a.png", "conversations": chat("<image> vs <image>", "Same.")},
        {"id": "extra", "image": ["a.png", "b.png"], "conversations": chat("<image>\nHi", "Hi.")},
    ]
    ds = make(folder, tokenizer, processor, records)
    assert ds.problems == {"few": ["few"], "missing": ["lost"], "extra": ["extra"]}
    assert [s["id"] for s in ds.text_data] == ["1", "two", "text", "extra"]
    assert ds[3]["pixel_values"].shape == (3, 32, 32)  # only the first image is used


def test_undecodable_image_raises_naming_the_file(folder, tokenizer, processor):
    records = [{"id": "b", "image": "broken.png", "conversations": chat("<image>\nHi", "Hi.")}]
    ds = make(folder, tokenizer, processor, records)
    with pytest.raises(ValueError, match=r"sample 0: cannot decode image .*broken\.png"):
        ds[0]


def test_nothing_usable_and_bad_json_raise(folder, tokenizer, processor):
    records = [{"id": "x", "image": "missing.png", "conversations": chat("<image>\nHi", "Hi.")}]
    with pytest.raises(ValueError, match="no usable sample"):
        make(folder, tokenizer, processor, records)
    path = folder / "bad.jsonl"
    path.write_text(json.dumps(GOOD[0]) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        LLaVADataset(str(folder / "images"), processor, data_path=str(path), tokenizer=tokenizer)


def test_offline_processed_text_folder(folder, tokenizer, processor):
    ds = make(folder, tokenizer, processor)
    ds.text_data.save_to_disk(str(folder / "offline"))
    offline = LLaVADataset(
        str(folder / "images"), processor, offline_processed_text_folder=str(folder / "offline")
    )
    assert len(offline) == len(ds)
    torch.testing.assert_close(offline[1]["pixel_values"], ds[1]["pixel_values"])
    assert offline[1]["input_ids"] == ds[1]["input_ids"]


def test_collated_batch_trains_a_llava_model(
    folder, tokenizer, processor, tiny_llama_path, tmp_path
):
    from transformers import AutoModelForCausalLM

    from xtuner.dataset.collate_fns import default_collate_fn
    from xtuner.dataset.samplers import LengthGroupedSampler
    from xtuner.demo.llava import build_tiny_clip
    from xtuner.model import LLaVAModel

    ds = make(folder, tokenizer, processor, dataset_map_fn=llava_map_fn, records=SINGLE)
    sampler = LengthGroupedSampler(ds, per_device_batch_size=3, length_property="modality_length")
    batch = default_collate_fn([ds[i] for i in sampler])["data"]
    vision, _ = build_tiny_clip(str(tmp_path / "clip"))
    model = LLaVAModel(
        llm=dict(
            type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path=tiny_llama_path
        ),
        visual_encoder=vision,
        use_activation_checkpointing=False,
    )
    out = model(batch, mode="loss")
    out["loss"].backward()
    labels = [torch.tensor(ds[i]["labels"]) for i in range(len(ds))]
    assert int(out["num_tokens"]) == sum(int((lab[1:] != IGNORE_INDEX).sum()) for lab in labels)
    assert model.projector.model[0].weight.grad.abs().sum() > 0
