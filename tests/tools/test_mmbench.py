"""`xtuner mmbench`: an MMBench-format TSV answered by a tiny LLaVA, results in MMBench layout."""

from __future__ import annotations

import base64
import io
import json
import sys

import pandas as pd

from tests.tools.test_chat import tiny_llava
from xtuner.entry_point import cli
from xtuner.tools.mmbench import parse_letter, question_text


def _png(color: str, shape: str, size: tuple[int, int] = (32, 32)) -> str:
    from xtuner.demo.llava import draw_shape

    buffer = io.BytesIO()
    draw_shape(color, shape, size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _always_a(base: str, save_dir: str) -> str:
    """The demo LLM planted to answer 'A' after any token: with the attention and MLP outputs
    zeroed the last hidden state is the token's embedding, whose first coordinate is set to 1
    and is the only one the final norm keeps; the head maps it to 'A' alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.get_input_embeddings().weight[:, 0] = 1.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.convert_tokens_to_ids("A"), 0] = 10.0
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return save_dir


def _chat_answers(rows, work, model, monkeypatch, capsys) -> list[str]:
    """The rows' questions through `xtuner chat --prompts`, one conversation each, with the
    images mmbench wrote."""
    prompts = "".join(
        json.dumps(
            {
                "input": question_text(pd.Series(r))[0],
                "new_conversation": True,
                "image": str(work / "images" / f"{r['index']}.png"),
            }
        )
        + "\n"
        for r in rows
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompts))
    assert cli(["chat", *model, "--temperature", "0", "--prompts", "-"]) == 0
    return [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]


def test_mmbench_writes_predictions_and_accuracy(tmp_path, demo_assets, capsys, monkeypatch):
    llava, clip, _ = tiny_llava(tmp_path, demo_assets, llm_lora=False)
    llm = _always_a(demo_assets["model"], str(tmp_path / "always_a"))
    rows = [
        dict(
            index=10,
            question="What colour is the shape?",
            hint=None,
            A="red",
            B="green",
            C="blue",
            D="yellow",
            answer="A",
            category="colour",
            image=_png("red", "circle"),
        ),
        dict(
            index=11,
            question="Which shape is it?",
            hint="Look at the corners.",
            A="square",
            B="circle",
            C="triangle",
            D=None,
            answer="C",
            category="shape",
            image=_png("blue", "triangle"),
        ),
        dict(
            index=12,
            question="What colour is the shape?",
            hint=None,
            A="red",
            B="green",
            C="blue",
            D="yellow",
            answer="B",
            category="colour",
            image=_png("green", "square"),
        ),
    ]
    tsv = tmp_path / "mmbench.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    work = tmp_path / "work"
    model = [llm, "--llava", llava, "--visual-encoder", clip, "--max-new-tokens", "1"]
    argv = ["mmbench", *model, "--data-path", str(tsv), "--work-dir", str(work)]
    assert cli(argv) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()

    result = pd.read_csv(work / "mmbench_result.tsv", sep="\t", keep_default_na=False)
    assert list(result.columns) == [
        "index",
        "question",
        "hint",
        "A",
        "B",
        "C",
        "D",
        "answer",
        "prediction",
        "category",
    ]
    assert result["index"].tolist() == [10, 11, 12]

    # Reference: the same questions through `xtuner chat --prompts`, one conversation each.
    answers = _chat_answers(rows, work, model, monkeypatch, capsys)
    options = [["A", "B", "C", "D"], ["A", "B", "C"], ["A", "B", "C", "D"]]
    expected = [parse_letter(a, o) for a, o in zip(answers, options)]
    assert result["prediction"].tolist() == expected == ["A", "A", "A"]

    scores = json.loads((work / "mmbench_result.json").read_text())
    assert scores == {"accuracy": 1 / 3, "accuracy_colour": 0.5, "accuracy_shape": 0.0}
    # The hint goes first, a missing option is left out.
    assert question_text(pd.Series(rows[1])) == (
        "Look at the corners.\nWhich shape is it?\nA. square\nB. circle\nC. triangle\n"
        "Answer with the option's letter from the given choices directly.",
        ["A", "B", "C"],
    )


def test_parse_letter_takes_the_first_option_named():
    assert parse_letter("B", ["A", "B", "C", "D"]) == "B"
    assert parse_letter("The answer is C. blue", ["A", "B", "C", "D"]) == "C"
    assert parse_letter("Definitely", ["A", "B", "C", "D"]) == ""
    assert parse_letter("D", ["A", "B", "C"]) == ""


def test_mmbench_and_chat_with_an_internvl_checkpoint(internvl_path, tmp_path, capsys):
    """An InternVL checkpoint is the model itself (no --llava): each answer is the greedy
    token the HF model gives for the prompt with the image's tiles and tile tokens."""
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    from xtuner.dataset.internvl_dataset import ImageTiler
    from xtuner.tools import chat
    from xtuner.utils.constants import IMAGE_TOKEN_INDEX

    path = internvl_path
    rows = [
        dict(
            index=1,
            question="Which colour?",
            A="red",
            B="blue",
            answer="A",
            image=_png("red", "circle"),
        ),
        dict(
            index=2,
            question="Which shape?",
            A="square",
            B="circle",
            answer="A",
            image=_png("blue", "square", (64, 32)),
        ),
    ]
    tsv = tmp_path / "mmbench.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    work = tmp_path / "work"
    model = [path, "--prompt-template", "qwen_chat", "--max-new-tokens", "1"]
    assert cli(["mmbench", *model, "--data-path", str(tsv), "--work-dir", str(work)]) == 0
    capsys.readouterr()
    result = pd.read_csv(work / "mmbench_result.tsv", sep="\t", keep_default_na=False)
    assert result["index"].tolist() == [1, 2]

    # The same questions through an `xtuner chat` session, one conversation each.
    args = chat.build_parser().parse_args([*model, "--temperature", "0"])
    session = chat.build_session(args)
    images = [str(work / "images" / f"{r['index']}.png") for r in rows]
    texts = [question_text(pd.Series(r))[0] for r in rows]
    answers = [
        session.answer(chat.Turn(text, image=image, new_conversation=True))["answer"]
        for text, image in zip(texts, images)
    ]
    assert result["prediction"].tolist() == [parse_letter(a, ["A", "B"]) for a in answers]

    # Reference: the prompt's image token written out by hand, through the HF model.
    tok = AutoTokenizer.from_pretrained(path)
    hf = InternVLForConditionalGeneration.from_pretrained(path).eval()
    for text, image_file, answer in zip(texts, images, answers):
        with Image.open(image_file) as image:
            tiles = ImageTiler(32, 1, 6)(image.convert("RGB"))
        session.reset()  # a new conversation, as each question had
        ids = session.prompt_ids("<image>\n" + text)
        at = ids.index(IMAGE_TOKEN_INDEX)
        block = [
            tok.start_image_token_id,
            *[tok.context_image_token_id] * (4 * len(tiles)),
            tok.end_image_token_id,
        ]
        ids = ids[:at] + block + ids[at + 1 :]
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids]), pixel_values=tiles).logits
        assert answer == tok.decode([int(logits[0, -1].argmax())]).strip()
    assert len(tiles) == 3  # the wide image: 2 tiles and a thumbnail
