"""check-custom-dataset reports every problem of a data file in one pass."""

from __future__ import annotations

import json
import os.path as osp

import pytest

from xtuner.tools.check_custom_dataset import main

HERE = osp.dirname(osp.abspath(__file__))


def write_config(tmp_path, tokenizer_path, records, max_length=512, pack=True) -> str:
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n",
        encoding="utf-8",
    )
    with open(osp.join(HERE, "dataset_tools_config.py.tmpl"), encoding="utf-8") as f:
        text = f.read()
    config = tmp_path / "config.py"
    config.write_text(
        text.format(
            tokenizer_path=tokenizer_path, data_path=data, max_length=max_length, pack=pack
        ),
        encoding="utf-8",
    )
    return str(config)


def good(i: int) -> dict:
    return {"instruction": f"Reverse word {i}.", "input": f"w{i}", "output": f"{i}w"}


def test_reports_all_problems_with_line_and_record(tmp_path, demo_assets, capsys):
    records = [
        good(0),
        '{"instruction": "broken", ',
        {"instruction": "no output here"},
        good(3),
        {"instruction": "wrong type", "output": 42},
        {"instruction": "nothing to learn", "output": "<nooutput>"},
        '["not", "an", "object"]',
        good(7),
    ]
    config = write_config(tmp_path, demo_assets["tokenizer"], records)
    assert main([config]) == 1
    out = capsys.readouterr().out
    data = str(tmp_path / "data.jsonl")
    assert "train_dataloader.dataset.datasets[0]:" in out
    expected = [
        f"{data}:2 (record 1): invalid JSON",
        f"{data}:3 (record 2): missing fields",
        f"{data}:5 (record 4): with non-string messages",
        f"{data}:6 (record 5): empty",
        f"{data}:7 (record 6): missing fields",
    ]
    for line in expected:
        assert line in out
    assert "8 records, 3 usable" in out and "5 problems found" in out
    for i in (0, 3, 7):
        assert f"(record {i})" not in out


def test_reports_truncation_that_leaves_nothing_to_learn(tmp_path, demo_assets, capsys):
    config = write_config(tmp_path, demo_assets["tokenizer"], [good(0), good(1)], max_length=40)
    assert main([config]) == 1
    out = capsys.readouterr().out
    assert "no output token is trained after truncation to max_length=40" in out
    assert "note: 2 records are longer than max_length=40" in out


def test_clean_data_passes(tmp_path, demo_assets, capsys):
    config = write_config(tmp_path, demo_assets["tokenizer"], [good(i) for i in range(5)])
    assert main([config]) == 0
    out = capsys.readouterr().out
    assert "5 records, 5 usable" in out and "no problems found" in out


def test_bad_arguments_exit_non_zero(tmp_path, capsys):
    assert main([str(tmp_path / "missing.py")]) == 1
    assert "neither a file nor a bundled config" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])
