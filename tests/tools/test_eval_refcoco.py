"""`xtuner eval_refcoco`: a tiny LLaVA planted to answer one box, scored with upstream's metric."""

from __future__ import annotations

import json

from tests.tools.test_chat import tiny_llava
from xtuner.entry_point import cli
from xtuner.tools.eval_refcoco import box_iou, parse_box


def _box_writer(base: str, save_dir: str) -> str:
    """The demo LLM planted to write '<1><1><1>...' after the vicuna prompt's ':'.

    With the attention and MLP outputs zeroed the last hidden state is the normalised embedding
    of the last token; the four tokens of the chain get one-hot embeddings and the head maps
    each to its successor (':' -> '<' -> '1' -> '>' -> '<')."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    chain = [tokenizer.convert_tokens_to_ids(t) for t in (":", "<", "1", ">")]
    successor = {chain[0]: chain[1], chain[1]: chain[2], chain[2]: chain[3], chain[3]: chain[1]}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.get_input_embeddings().weight
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for k, token in enumerate(chain):
            embed[token] = 0.0
            embed[token, k] = 1.0
            model.lm_head.weight[successor[token], k] = 10.0
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return save_dir


def test_eval_refcoco_scores_the_planted_box(tmp_path, demo_assets, capsys):
    from xtuner.demo.llava import draw_shape

    llava, clip, _ = tiny_llava(tmp_path, demo_assets, llm_lora=False)
    llm = _box_writer(demo_assets["model"], str(tmp_path / "box_writer"))
    images = tmp_path / "images" / "coco" / "train2017"
    images.mkdir(parents=True)
    records = []
    # Boxes in pixels of a 100 x 100 image, i.e. in percent: [1,1,1,1], [0,0,2,2], [1,1,2,1].
    for n, bbox in enumerate([[1, 1, 0.5, 0.5], [0, 0, 2, 2], [1, 1, 1.5, 0.5]]):
        number = f"{n:012d}"
        draw_shape("red", "circle").save(images / f"{number}.jpg")
        records.append(
            dict(
                img_id=f"COCO_train2014_{number}_0",
                sents=f"thing {n}",
                bbox=bbox,
                height=100,
                width=100,
            )
        )
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(records))
    work = tmp_path / "work"
    argv = ["eval_refcoco", llm, "--llava", llava, "--visual-encoder", clip]
    argv += ["--data-path", str(data), "--image-folder", str(tmp_path / "images")]
    argv += ["--work-dir", str(work), "--max-new-tokens", "12"]
    assert cli(argv) == 0, capsys.readouterr().err[-3000:]
    assert "Acc: 0.3333333333333333" in capsys.readouterr().out

    rows = [
        json.loads(line) for line in (work / "eval_refcoco_result.jsonl").read_text().splitlines()
    ]
    assert [r["answer"] for r in rows] == ["<1><1><1><1>"] * 3
    assert [r["truth"] for r in rows] == [[1, 1, 1, 1], [0, 0, 2, 2], [1, 1, 2, 1]]
    # Inclusive corners: the 1-cell box inside a 3 x 3 box is 1/9; half of a 2-cell box is 1/2,
    # which is not above 0.5.
    assert [r["iou"] for r in rows] == [1.0, 1 / 9, 1 / 2]
    scores = json.loads((work / "eval_refcoco_result.json").read_text())
    assert scores == {"accuracy": 1 / 3, "num_samples": 3, "format_errors": 0}

    assert cli([*argv, "--launcher", "pytorch"]) == 1
    assert "runs in a single process" in capsys.readouterr().err
    # A missing image is named before the model loads.
    (images / f"{0:012d}.jpg").unlink()
    assert cli(argv) == 1
    assert "000000000000.jpg not found" in capsys.readouterr().err


def test_box_parsing_and_iou():
    assert parse_box("{<10><20><30><40>}") == [10, 20, 30, 40]
    assert parse_box("{<10><20><30>}") is None
    assert parse_box("no box") is None
    assert box_iou([0, 0, 9, 9], [0, 0, 9, 9]) == 1.0
    assert box_iou([0, 0, 9, 9], [10, 10, 20, 20]) == 0.0
    assert box_iou([0, 0, 9, 9], [5, 0, 14, 9]) == 50 / 150
