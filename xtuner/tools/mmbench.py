"""``xtuner mmbench MODEL --llava DIR --visual-encoder DIR --data-path MMBench_DEV_EN.tsv``.

Answers every question of an MMBench-format TSV (``index``, ``question``, ``hint``, ``A``-``D``,
``image`` as base64, optionally ``answer``, ``category``, ``l2-category``, ``split``) with a
LLaVA model (or an InternVL checkpoint given as MODEL), greedily, one new conversation per
question, and writes
``<work-dir>/mmbench_result.tsv`` (the question columns and ``prediction``, the layout the
MMBench evaluation expects; also ``.xlsx`` when openpyxl is installed) and, when the TSV has
answers, ``mmbench_result.json`` with the accuracy overall and per category. The model options
are those of ``xtuner chat``.
"""

from __future__ import annotations

import contextlib
import json
import os
import os.path as osp
import re

from xtuner.tools import chat
from xtuner.tools.utils import UserError, run_tool

PROG = "xtuner mmbench"
LETTERS = ("A", "B", "C", "D")
INSTRUCTION = "Answer with the option's letter from the given choices directly."
RESULT_COLUMNS = (
    "index",
    "question",
    "hint",
    *LETTERS,
    "answer",
    "prediction",
    "category",
    "l2-category",
    "split",
)


def question_text(row) -> tuple[str, list[str]]:
    """The prompt of one TSV row and its option letters."""
    import pandas as pd

    options = [x for x in LETTERS if x in row and not pd.isna(row[x])]
    text = str(row["question"])
    if "hint" in row and not pd.isna(row["hint"]):
        text = f"{row['hint']}\n{text}"
    text += "".join(f"\n{x}. {row[x]}" for x in options)
    return f"{text}\n{INSTRUCTION}", options


def parse_letter(answer: str, options: list[str]) -> str:
    """The option letter a reply names (its first standalone letter), or '' for none."""
    match = re.search(rf"\b([{''.join(options)}])\b", answer)
    return match.group(1) if match else ""


def main(argv: list[str] | None = None) -> int:
    parser = chat.evaluation_parser(
        PROG,
        __doc__,
        "an MMBench-format TSV file",
        work_dir="./work_dirs/mmbench",
        max_new_tokens=16,
    )
    args = parser.parse_args(argv)

    def body() -> int:
        import base64

        import pandas as pd

        chat.check_evaluation_args(args, allow_internvl=True)
        table = pd.read_csv(args.data_path, sep="\t")
        missing = [c for c in ("index", "question", "A", "B", "image") if c not in table]
        if missing:
            raise UserError(f"--data-path {args.data_path} lacks the columns {missing}")
        chat._check_args(args)
        session = chat.build_session(args)
        images = osp.join(args.work_dir, "images")
        os.makedirs(images, exist_ok=True)
        predictions = []
        for _, row in table.iterrows():
            path = osp.join(images, f"{row['index']}.png")
            with open(path, "wb") as f:
                f.write(base64.b64decode(row["image"]))
            text, options = question_text(row)
            answer = session.answer(chat.Turn(text, image=path, new_conversation=True))
            predictions.append(parse_letter(answer["answer"], options))
        table["prediction"] = predictions
        result = table[[c for c in RESULT_COLUMNS if c in table]]
        result.to_csv(osp.join(args.work_dir, "mmbench_result.tsv"), sep="\t", index=False)
        with contextlib.suppress(ImportError):  # openpyxl is optional
            result.to_excel(osp.join(args.work_dir, "mmbench_result.xlsx"), index=False)
        if "answer" in table:
            correct = table["prediction"] == table["answer"]
            scores = {"accuracy": float(correct.mean())}
            if "category" in table:
                by = correct.groupby(table["category"]).mean()
                scores.update({f"accuracy_{k}": float(v) for k, v in by.items()})
            with open(osp.join(args.work_dir, "mmbench_result.json"), "w") as f:
                json.dump(scores, f, indent=2)
            print(json.dumps(scores, indent=2))
        print(f"{PROG}: {len(table)} answers in {osp.join(args.work_dir, 'mmbench_result.tsv')}")
        return 0

    return run_tool(body, PROG)
