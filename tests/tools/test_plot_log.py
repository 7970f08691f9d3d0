"""`xtuner plot-log`: mmengine scalars of one or more runs into one PNG."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from xtuner.entry_point import cli
from xtuner.tools import plot_log
from xtuner.tools.plot_log import figure_size, read_run


def write_run(work_dir, timestamp: str, steps, loss_scale: float = 1.0, extra: str = "") -> None:
    """An mmengine ``<work_dir>/<timestamp>/vis_data/scalars.json`` with one line per step."""
    folder = work_dir / timestamp / "vis_data"
    folder.mkdir(parents=True)
    lines = [
        json.dumps(
            {
                "lr": 1e-3,
                "loss": loss_scale / step,
                "loss_ce": 0.5 / step,
                "iter": step,
                "step": step,
            }
        )
        for step in steps
    ]
    (folder / "scalars.json").write_text("\n".join(lines) + "\n" + extra)


@pytest.fixture
def runs(tmp_path):
    focal, ce = tmp_path / "focal", tmp_path / "ce"
    write_run(focal, "20260101_000000", range(1, 11), loss_scale=2.0)
    write_run(ce, "20260101_000000", range(1, 11))
    return [str(focal), str(ce)]


def test_plots_several_keys_of_several_runs(runs, tmp_path, capsys):
    out = tmp_path / "plots" / "cmp.png"
    assert plot_log.main([*runs, "--keys", "loss", "lr", "--out", str(out)]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == figure_size(2) == (1200, 400)
    assert "loss, lr of focal, ce" in capsys.readouterr().out


def test_cli_default_key_and_file(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(["plot-log", *runs]) == 0
    with Image.open(tmp_path / "plot_loss.png") as image:
        assert image.size == figure_size(1) == (600, 400)
    assert figure_size(3) == (1200, 800)


def test_resumed_run_is_joined_and_a_fresh_run_is_not(tmp_path):
    resumed = tmp_path / "resumed"
    write_run(resumed, "20260101_000000", range(1, 11), loss_scale=1.0)
    write_run(resumed, "20260102_000000", range(6, 16), loss_scale=3.0)
    records = read_run(str(resumed))
    assert [r["step"] for r in records] == list(range(1, 16))
    assert records[4]["loss"] == pytest.approx(1.0 / 5)  # before the resume: the old run
    assert records[5]["loss"] == pytest.approx(3.0 / 6)  # overlap: the newer run wins

    fresh = tmp_path / "fresh"
    write_run(fresh, "20260101_000000", range(1, 21))
    write_run(fresh, "20260102_000000", range(1, 6))
    assert [r["step"] for r in read_run(str(fresh))] == [1, 2, 3, 4, 5]
    # A timestamp folder or the file itself work too.
    assert len(read_run(str(fresh / "20260101_000000"))) == 20
    assert len(read_run(str(fresh / "20260101_000000" / "vis_data" / "scalars.json"))) == 20


def test_errors_name_the_problem(runs, tmp_path, capsys):
    assert plot_log.main([str(tmp_path / "missing")]) == 1
    assert "no such directory" in capsys.readouterr().err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert plot_log.main([str(empty)]) == 1
    assert "LocalVisBackend" in capsys.readouterr().err

    out = str(tmp_path / "x.png")
    assert plot_log.main([*runs, "--keys", "accuracy", "--out", out]) == 1
    err = capsys.readouterr().err
    assert "--keys accuracy" in err and "loss, loss_ce, lr" in err

    broken = tmp_path / "broken"
    write_run(broken, "20260101_000000", range(1, 3), extra="{not json\n")
    assert plot_log.main([str(broken), "--out", out]) == 1
    assert "line 3: not JSON" in capsys.readouterr().err


def test_non_finite_points_are_left_out(tmp_path):
    out = tmp_path / "nan.png"
    panel = plot_log.Panel("loss", {"run": ([0, 1, 2], [1.0, float("nan"), 0.5])})
    assert plot_log.plot_panels([panel], str(out), "title") == str(out)
    with Image.open(out) as image:
        assert image.size == figure_size(1)
