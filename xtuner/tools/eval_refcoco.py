"""``xtuner eval_refcoco MODEL --llava DIR --visual-encoder DIR --data-path eval.json``:
RefCOCO grounding accuracy of a LLaVA model.

Each record of the RefCOCO evaluation file (``img_id``, ``sents``, ``bbox``, ``height``,
``width``; see ``xtuner.dataset.refcoco_json``) is asked, in a new conversation with its image
(``--image-folder``/coco/train2017/NUMBER.jpg), ``[refer] give me the location of SENTS`` as
training on ``RefCOCOJsonDataset`` asks it (``llava_map_fn``, the image first). The reply's
integers are read as the box ``x1 y1 x2 y2`` in percent of the image; a reply with other than
four integers counts as wrong. The metric is XTuner 0.x's: the share of records whose box
overlaps the true box (in the same percent grid, corners inclusive, so a box of ``a..b`` spans
``b - a + 1`` cells) with an IoU above 0.5. Written to ``--work-dir``:
``eval_refcoco_result.jsonl`` (each record's reply, boxes and IoU) and
``eval_refcoco_result.json`` (``accuracy``, ``num_samples``, ``format_errors``); the accuracy is
also printed as ``Acc: ...``. The model options are those of ``xtuner chat`` (greedy, at most
100 new tokens and the vicuna template by default, as upstream).
"""

from __future__ import annotations

import json
import os
import os.path as osp
import re

from xtuner.tools import chat
from xtuner.tools.utils import UserError, run_tool

PROG = "xtuner eval_refcoco"
RESULT = "eval_refcoco_result"


def parse_box(answer: str) -> list[int] | None:
    """The box a reply gives (its integers, when there are exactly four), else None."""
    numbers = [int(x) for x in re.findall(r"\d+", answer)]
    return numbers if len(numbers) == 4 else None


def box_iou(a: list[int], b: list[int]) -> float:
    """IoU of two ``[x1, y1, x2, y2]`` boxes on an integer grid with inclusive corners."""

    def area(box: list[int]) -> int:
        return (box[2] - box[0] + 1) * (box[3] - box[1] + 1)

    width = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    inter = width * height
    return inter / (area(a) + area(b) - inter)


def main(argv: list[str] | None = None) -> int:
    parser = chat.evaluation_parser(
        PROG,
        __doc__,
        "a RefCOCO evaluation JSON file",
        work_dir="./work_dirs/eval_refcoco",
        max_new_tokens=100,
        prompt_template="vicuna",
    )
    parser.add_argument(
        "--image-folder",
        default="data/llava_data/llava_images/",
        help="the folder holding coco/train2017/*.jpg",
    )
    # XTuner 0.x split the records over torchrun ranks; one process answers them all here.
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    args = parser.parse_args(argv)

    def body() -> int:
        from xtuner.dataset.map_fns import llava_map_fn
        from xtuner.dataset.refcoco_json import RefCOCOJsonEvalDataset

        if args.launcher != "none":
            raise UserError(
                f"--launcher {args.launcher}: eval_refcoco runs in a single process; run it "
                "without a launcher (and without torchrun)"
            )
        chat.check_evaluation_args(args)
        try:
            records = RefCOCOJsonEvalDataset.load_records(args.data_path)
        except ValueError as e:
            raise UserError(str(e)) from e
        for record in records:
            image = osp.join(args.image_folder, record["image"][0])
            if not osp.isfile(image):
                raise UserError(
                    f"record {record['id']!r}: image {image} not found; pass --image-folder "
                    "(the folder that holds coco/train2017)"
                )
        chat._check_args(args)
        session = chat.build_session(args)
        os.makedirs(args.work_dir, exist_ok=True)
        rows, right, format_errors = [], 0, 0
        for record in records:
            question = llava_map_fn(record)["conversation"][0]["input"]
            image = osp.join(args.image_folder, record["image"][0])
            answer = session.answer(chat.Turn(question, image=image, new_conversation=True))
            truth = RefCOCOJsonEvalDataset.normalize_bbox(
                record["bbox"], record["height"], record["width"]
            )
            box = parse_box(answer["answer"])
            iou = None if box is None else box_iou(box, truth)
            format_errors += box is None
            right += iou is not None and iou > 0.5
            rows.append(
                {
                    "id": record["id"],
                    "answer": answer["answer"],
                    "box": box,
                    "truth": truth,
                    "iou": iou,
                }
            )
        scores = {
            "accuracy": right / len(records),
            "num_samples": len(records),
            "format_errors": format_errors,
        }
        with open(osp.join(args.work_dir, f"{RESULT}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        with open(osp.join(args.work_dir, f"{RESULT}.json"), "w", encoding="utf-8") as f:
            json.dump(scores, f, indent=2)
        print(f"Acc: {scores['accuracy']}")
        if format_errors:
            print(f"{format_errors} of {len(records)} replies did not give a box of 4 integers")
        return 0

    return run_tool(body, PROG)


if __name__ == "__main__":
    raise SystemExit(main())
