"""``xtuner plot-log WORK_DIR [WORK_DIR ...]``: draw logged scalars of runs into one PNG.

mmengine writes one JSON object per logged iteration to
``<work_dir>/<timestamp>/vis_data/scalars.json`` (``{"step": 10, "loss": 1.2, "lr": ...}``).
Each chosen key gets a panel; each run is a line in it, so runs trained with different
losses can be compared side by side. A resumed run continues in a new timestamp folder: the
folders of one work dir are joined, the newest winning where steps overlap.

:func:`plot_panels` is the drawing helper that ``xtuner check-loss`` uses too.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import os.path as osp
from dataclasses import dataclass, field

from xtuner.tools.utils import UserError, run_tool

#: pixels of one panel (width, height); figures are a grid of panels, two per row.
PANEL_SIZE = (600, 400)
DPI = 100
LINE_STYLES = ("-", "--", "-.", ":")


@dataclass
class Panel:
    """One subplot: named lines sharing axes.

    Attributes:
        title: shown above the panel.
        series: line label -> (x values, y values).
        xlabel: the x axis label.
        ylabel: the y axis label (the title when empty).
    """

    title: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    xlabel: str = "step"
    ylabel: str = ""


def figure_size(n_panels: int) -> tuple[int, int]:
    """Pixel size (width, height) of a figure of ``n_panels`` panels."""
    cols = min(max(n_panels, 1), 2)
    rows = math.ceil(max(n_panels, 1) / cols)
    return PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows


def plot_panels(panels: list[Panel], out: str, title: str | None = None) -> str:
    """Draws the panels into a PNG of :func:`figure_size` pixels; returns its path.

    Non-finite y values are left out of their line (a NaN step shows as a gap in the data,
    not as a crash of the plot).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    width, height = figure_size(len(panels))
    cols = min(max(len(panels), 1), 2)
    rows = math.ceil(max(len(panels), 1) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False
    )
    try:
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        for ax, panel in zip(axes.flat, panels):
            for index, (label, (xs, ys)) in enumerate(panel.series.items()):
                points = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
                if points:
                    # Line styles differ too, so identical curves stay visible.
                    style = LINE_STYLES[index % len(LINE_STYLES)]
                    ax.plot(*zip(*points), style, label=label, linewidth=1.2)
            ax.set_title(panel.title, fontsize=10)
            ax.set_xlabel(panel.xlabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(panel.ylabel or panel.title)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        if title:
            fig.suptitle(title, fontsize=11)
        fig.tight_layout()
        os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
        # No bbox_inches='tight': the PNG keeps exactly figure_size() pixels.
        fig.savefig(out, dpi=DPI)
    finally:
        plt.close(fig)
    return out


def scalar_files(work_dir: str) -> list[str]:
    """The ``scalars.json`` files of a work dir (or a timestamp folder, or the file itself),
    oldest first."""
    if osp.isfile(work_dir):
        return [work_dir]
    if not osp.isdir(work_dir):
        raise UserError(f"{work_dir}: no such directory (give a work dir of 'xtuner train')")
    own = osp.join(work_dir, "vis_data", "scalars.json")
    if osp.isfile(own):
        return [own]
    files = sorted(glob.glob(osp.join(work_dir, "*", "vis_data", "scalars.json")))
    if not files:
        raise UserError(
            f"{work_dir}: no <timestamp>/vis_data/scalars.json in it. mmengine writes that file "
            "when the config's visualizer has a LocalVisBackend (the default when "
            "visualizer=None)"
        )
    return files


def _read_records(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}, line {number}: not JSON ({exc.msg})") from exc
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def read_run(work_dir: str) -> list[dict]:
    """The logged records of a run, in step order.

    The newest timestamp folder is the run; older folders are prepended for the steps
    before its first one (a resumed run), so a fresh run in a reused work dir is not mixed
    with an older, longer one.
    """
    runs = [_read_records(path) for path in scalar_files(work_dir)]
    runs = [run for run in runs if run]
    if not runs:
        return []
    merged = runs[-1]
    for older in reversed(runs[:-1]):
        first = min(r["step"] for r in merged)
        before = [r for r in older if r["step"] < first]
        if not before:
            break
        merged = before + merged
    return sorted(merged, key=lambda r: r["step"])


def run_labels(work_dirs: list[str]) -> list[str]:
    """Short, distinct line labels: the folder names, or the paths where names clash."""
    names = [osp.basename(osp.normpath(d)) or d for d in work_dirs]
    if len(set(names)) == len(names):
        return names
    return [osp.normpath(d) for d in work_dirs]


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        parser = argparse.ArgumentParser(prog="xtuner plot-log", description=__doc__)
        parser.add_argument("work_dirs", nargs="+", metavar="WORK_DIR", help="run folders")
        parser.add_argument(
            "--keys", nargs="+", default=["loss"], help="logged scalars to draw (default: loss)"
        )
        parser.add_argument("--out", help="PNG to write (default: plot_<keys>.png here)")
        parser.add_argument("--title", help="figure title")
        args = parser.parse_args(argv)
        runs = [read_run(d) for d in args.work_dirs]
        labels = run_labels(args.work_dirs)
        panels = []
        for key in args.keys:
            panel = Panel(key)
            for label, records in zip(labels, runs):
                points = [
                    (r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))
                ]
                if points:
                    panel.series[label] = tuple(map(list, zip(*points)))
            if not panel.series:
                logged = sorted({k for run in runs for r in run for k in r} - {"step"})
                raise UserError(
                    f"--keys {key}: no run logged it. Logged scalars: {', '.join(logged) or 'none'}"
                )
            panels.append(panel)
        out = args.out or f"plot_{'_'.join(args.keys)}.png"
        plot_panels(panels, out, args.title)
        width, height = figure_size(len(panels))
        print(f"wrote {out} ({width}x{height}): {', '.join(args.keys)} of {', '.join(labels)}")
        return 0

    return run_tool(body, "xtuner plot-log")


if __name__ == "__main__":
    raise SystemExit(main())
