"""RefCOCO JSON data: conversations, ids and labels against a hand-built reference, bad records."""

from __future__ import annotations

import json

import pytest
from transformers import CLIPImageProcessor

from xtuner.dataset.map_fns import llava_map_fn, template_map_fn_factory
from xtuner.dataset.refcoco_json import (
    InvRefCOCOJsonDataset,
    RefCOCOJsonDataset,
    RefCOCOJsonEvalDataset,
)
from xtuner.demo.llava import draw_shape
from xtuner.utils import PROMPT_TEMPLATE
from xtuner.utils.constants import IMAGE_TOKEN_INDEX

RECORD = {
    "id": "refcoco-unc-000000000009-the_left_cup",
    "image": "coco/train2017/000000000009.jpg",
    "sents": "the left cup",
    "bbox": [70.0, 50.0, 130.0, 100.0],
    "height": 480,
    "width": 640,
}
# x 70/640 = 10.9%, y 50/480 = 10.4%, x2 200/640 = 31.25%, y2 150/480 = 31.25%: cut, not rounded
BOX = "{<10><10><31><31>}"


@pytest.fixture(autouse=True)
def no_dataset_cache(monkeypatch):
    monkeypatch.setenv("XTUNER_DATASET_CACHE", "none")


def build(cls, tmp_path, tokenizer, records):
    (tmp_path / "coco" / "train2017").mkdir(parents=True, exist_ok=True)
    draw_shape("red", "square").save(tmp_path / "coco" / "train2017" / "000000000009.jpg")
    path = tmp_path / "refcoco.json"
    path.write_text(json.dumps(records))
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return cls(
        data_path=str(path),
        image_folder=str(tmp_path),
        tokenizer=tokenizer,
        image_processor=processor,
        dataset_map_fn=llava_map_fn,
        template_map_fn=dict(type=template_map_fn_factory, template=PROMPT_TEMPLATE.vicuna),
        max_length=256,
    )


def reference(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """LLaVA's layout with the vicuna template: the image first, the answer and EOS trained."""

    def enc(text):
        return tokenizer.encode(text, add_special_tokens=False)

    prompt = [tokenizer.bos_token_id] + enc("USER: ") + [IMAGE_TOKEN_INDEX]
    prompt += enc(f"\n{question} ASSISTANT:")
    reply = enc(answer) + [tokenizer.eos_token_id]
    return prompt + reply, [-100] * len(prompt) + reply


def test_grounding_and_inverse_samples_equal_the_reference(tmp_path, tokenizer):
    ds = build(RefCOCOJsonDataset, tmp_path, tokenizer, [RECORD])
    assert len(ds) == 7  # one conversation per instruction of the pool
    questions = [t.format("the left cup") for t in RefCOCOJsonDataset.instruction_pool]
    for i, question in enumerate(questions):
        ids, labels = reference(tokenizer, question, BOX)
        assert ds[i]["input_ids"] == ids and ds[i]["labels"] == labels
        assert ds[i]["pixel_values"].shape == (3, 32, 32)

    inv = build(InvRefCOCOJsonDataset, tmp_path, tokenizer, [RECORD])
    assert len(inv) == 7
    ids, labels = reference(tokenizer, f"[identify] what is it in {BOX}", "the left cup")
    assert inv[3]["input_ids"] == ids and inv[3]["labels"] == labels


def test_eval_records_and_bad_records(tmp_path, tokenizer):
    record = {k: v for k, v in RECORD.items() if k not in ("id", "image")}
    record["img_id"] = "COCO_train2014_000000000009_3"
    (only,) = RefCOCOJsonEvalDataset.load_records(str(_write(tmp_path, [record])))
    assert only["image"] == ["coco/train2017/000000000009.jpg"]
    assert only["id"] == "000000000009-the left cup"
    assert (
        only["conversations"][0]["value"] == "[refer] give me the location of the left cup\n<image>"
    )
    assert only["conversations"][1]["value"] == BOX

    with pytest.raises(ValueError, match=r"refcoco.json record 1: 'bbox' must be \[x, y, width"):
        build(RefCOCOJsonDataset, tmp_path, tokenizer, [RECORD, {**RECORD, "bbox": [1, 2]}])
    with pytest.raises(ValueError, match="record 0: 'width' .* must be a positive number"):
        build(RefCOCOJsonDataset, tmp_path, tokenizer, [{**RECORD, "width": 0}])


def _write(tmp_path, records):
    path = tmp_path / "refcoco.json"
    path.write_text(json.dumps(records))
    return path
