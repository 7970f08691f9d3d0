"""list-dataset-format lists every registered map function."""

from __future__ import annotations

from xtuner.registry import MAP_FUNC
from xtuner.tools.list_dataset_format import main


def test_lists_the_registered_map_functions(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("alpaca_map_fn", "openai_map_fn", "pretrain_map_fn", "crime_kg_assitant_map_fn"):
        assert f"  {name} " in out
    assert len(out.strip().splitlines()) == len(MAP_FUNC.module_dict) + 1
