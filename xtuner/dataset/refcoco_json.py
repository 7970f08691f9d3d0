"""RefCOCO referring-expression data as LLaVA conversations (XTuner 0.x ``refcoco_json``).

A RefCOCO JSON file (a list, or JSON Lines) holds one record per expression::

    {"id": "refcoco-unc-000000000009-the_left_cup", "image": "coco/train2017/000000000009.jpg",
     "sents": "the left cup", "bbox": [x, y, w, h], "height": 480, "width": 640}

``bbox`` is in pixels (COCO's ``x, y, width, height``). It is written as the text
``{<x1><y1><x2><y2>}``: the corners as whole percentages of the image size
(``int(100 * x / width)``, ...). Each record gives one conversation per instruction of the
class's pool (7 for training, so the data set is 7 times the records):

- :class:`RefCOCOJsonDataset` (grounding): ``[refer] where is {sents} ?\\n<image>`` ->
  ``{<x1><y1><x2><y2>}``;
- :class:`InvRefCOCOJsonDataset` (the inverse, captioning a region):
  ``[identify] what is it in {box}\\n<image>`` -> ``{sents}``;
- :class:`RefCOCOJsonEvalDataset` (evaluation, what ``xtuner eval_refcoco`` asks): one
  instruction, ``[refer] give me the location of {sents}``, for records with ``img_id``
  (``COCO_train2014_000000000009_...``: the image is ``coco/train2017/000000000009.jpg``).

The conversations then go through :class:`~xtuner.dataset.LLaVADataset` (map function,
template, images). A record without a usable ``sents``, ``bbox``, ``height`` or ``width``
stops the build with its index (the files are written by a converter, so a bad record means a
broken file).
"""

from __future__ import annotations

from typing import Any

from .llava import LLaVADataset, load_llava_records

__all__ = ["InvRefCOCOJsonDataset", "RefCOCOJsonDataset", "RefCOCOJsonEvalDataset"]


def _check(record: dict, where: str) -> None:
    if not isinstance(record.get("sents"), str):
        raise ValueError(f"{where}: 'sents' (the referring expression) must be a string")
    bbox = record.get("bbox")
    if not (
        isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
    ):
        raise ValueError(f"{where}: 'bbox' must be [x, y, width, height] in pixels, got {bbox!r}")
    for key in ("height", "width"):
        if not isinstance(record.get(key), (int, float)) or record[key] <= 0:
            raise ValueError(f"{where}: '{key}' (of the image) must be a positive number")


class RefCOCOJsonDataset(LLaVADataset):
    """RefCOCO grounding conversations (see the module docstring); the arguments are those
    of :class:`~xtuner.dataset.LLaVADataset`."""

    instruction_pool = (
        "[refer] {}",
        "[refer] give me the location of {}",
        "[refer] where is {} ?",
        "[refer] from this image, tell me the location of {}",
        "[refer] the location of {} is",
        "[refer] could you tell me the location for {} ?",
        "[refer] where can I locate the {} ?",
    )

    def __init__(
        self,
        data_path: str,
        image_folder: str,
        tokenizer: Any,
        image_processor: Any,
        max_dataset_length: int | None = None,
        dataset_map_fn: Any = None,
        template_map_fn: Any = None,
        max_length: int = 2048,
        pad_image_to_square: bool = False,
    ) -> None:
        super().__init__(
            image_folder=image_folder,
            image_processor=image_processor,
            data_path=data_path,
            tokenizer=tokenizer,
            max_dataset_length=max_dataset_length,
            dataset_map_fn=dataset_map_fn,
            template_map_fn=template_map_fn,
            max_length=max_length,
            pad_image_to_square=pad_image_to_square,
        )

    @staticmethod
    def normalize_bbox(bbox: list[float], height: float, width: float) -> list[int]:
        """``[x, y, w, h]`` in pixels -> the corners ``[x1, y1, x2, y2]`` in whole percent."""
        x, y, w, h = bbox
        return [int(100 * v) for v in (x / width, y / height, (x + w) / width, (y + h) / height)]

    @classmethod
    def box_text(cls, record: dict) -> str:
        """The record's box as the model writes it, ``{<x1><y1><x2><y2>}``."""
        corners = cls.normalize_bbox(record["bbox"], record["height"], record["width"])
        return "{" + "".join(f"<{v}>" for v in corners) + "}"

    @classmethod
    def gen_refcoco_conversations(cls, record: dict, instruction: str = "{}") -> list[dict]:
        """The question (with the image token after it) and answer of one record."""
        return [
            {"from": "human", "value": instruction.format(record["sents"]) + "\n<image>"},
            {"from": "gpt", "value": cls.box_text(record)},
        ]

    @classmethod
    def prepare_record(cls, record: dict, where: str) -> dict:
        """Hook for variants whose records need more than the check (eval image paths)."""
        return record

    @classmethod
    def load_records(cls, data_path: str) -> list[dict]:
        """The LLaVA conversations of a RefCOCO file, one per record and instruction."""
        records = []
        for i, record in enumerate(load_llava_records(data_path)):
            where = f"{data_path} record {i}"
            _check(record, where)
            record = cls.prepare_record(record, where)
            for instruction in cls.instruction_pool:
                conversations = cls.gen_refcoco_conversations(record, instruction)
                records.append({**record, "conversations": conversations})
        return records


class RefCOCOJsonEvalDataset(RefCOCOJsonDataset):
    """The evaluation questions: one instruction per record, images named by ``img_id``."""

    instruction_pool = ("[refer] give me the location of {}",)

    @classmethod
    def prepare_record(cls, record: dict, where: str) -> dict:
        if not isinstance(record.get("img_id"), str) or record["img_id"].count("_") < 2:
            raise ValueError(
                f"{where}: an evaluation record needs 'img_id' like COCO_train2014_<number>_<n>, "
                f"got {record.get('img_id')!r}"
            )
        image_id = record["img_id"].split("_")[-2]
        return {
            **record,
            "image": [f"coco/train2017/{image_id}.jpg"],
            "id": f"{image_id}-{record['sents']}",
        }


class InvRefCOCOJsonDataset(RefCOCOJsonDataset):
    """Region captioning: the box is asked about, the expression is the answer."""

    instruction_pool = (
        "[identify] {}",
        "[identify] what object is in this location {}",
        "[identify] identify the object present at this location {}",
        "[identify] what is it in {}",
        "[identify] describe this object in {}",
        "[identify] this {} is",
        "[identify] the object in {} is",
    )

    @classmethod
    def gen_refcoco_conversations(cls, record: dict, instruction: str = "{}") -> list[dict]:
        return [
            {"from": "human", "value": instruction.format(cls.box_text(record)) + "\n<image>"},
            {"from": "gpt", "value": record["sents"]},
        ]
