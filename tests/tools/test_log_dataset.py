"""log-dataset prints the rendered text, the masked text, the ids and the labels."""

from __future__ import annotations

from transformers import AutoTokenizer

from xtuner.tools.log_dataset import main, render, render_masked
from xtuner.utils.constants import IMAGE_TOKEN_INDEX

from .test_check_custom_dataset import good, write_config


def test_prints_every_view_of_a_sample(tmp_path, demo_assets, capsys, monkeypatch):
    monkeypatch.setenv("XTUNER_DATASET_CACHE", str(tmp_path / "cache"))
    config = write_config(
        tmp_path, demo_assets["tokenizer"], [good(i) for i in range(3)], pack=False
    )
    assert main([config, "--index", "1"]) == 0
    out = capsys.readouterr().out
    for title in ("text", "masked text", "input_ids", "labels"):
        assert f"#################### {title} ####################" in out
    assert "<|User|>:Reverse word 1.\nw1\n<|Bot|>:1w</s>" in out
    assert "[-100 x " in out and "]1w</s>[-100 x " in out
    assert "sample 1 of 3" in out
    assert main([config, "--show", "labels", "--num", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("#### labels ####") == 2 and "#### text ####" not in out


def test_render_helpers(demo_assets):
    tokenizer = AutoTokenizer.from_pretrained(demo_assets["tokenizer"])
    ids = tokenizer.encode("look", add_special_tokens=False)
    assert render(tokenizer, [*ids, IMAGE_TOKEN_INDEX, *ids]) == "look<image>look"
    assert render_masked(tokenizer, [-100, -100, *ids, -100]) == "[-100 x 2]look[-100 x 1]"
