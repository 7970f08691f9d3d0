"""Wall time of the ``xtuner`` command: each light mode and ``xtuner train`` up to its first
logged iteration, for this working tree ("after") and a reference commit ("before").

The reference commit is exported with ``git archive`` into a temporary folder; both trees run
with this interpreter (the same installed libraries), each command in a fresh process, with
``PYTHONPATH`` pointing at the tree. Rounds are interleaved (before, after, before, ...) after
one untimed warm-up round that also builds the demo model and compiles both trees' bytecode;
the table gives medians, the range over the rounds, and the median CPU time of the process.

``train`` runs the bundled demo config (``demo_tiny_llama_full_alpaca``, its chat-before-
training hook included) with the logger at every iteration, and is stopped once the first
``Iter(train) [1/...]`` line appears: that is the start-up time a user waits for.

    python benchmarks/bench_cli.py                      # before = 1c2f940, 3 rounds
    python benchmarks/bench_cli.py --ref main --repeat 5 --out benchmarks/results/cli_cpu.md
"""

from __future__ import annotations

import argparse
import os
import os.path as osp
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
FIRST_ITER = re.compile(r"Iter\(train\) \[\s*1/")
TRAIN_OPTIONS = [
    "--cfg-options",
    "train_cfg.max_epochs=None",
    "train_cfg.max_iters=20",
    "default_hooks.logger.interval=1",
]


#: the case timed up to its first logged iteration (the others run to their end).
TRAIN_CASE = "xtuner train demo (to 1st iter)"


def cases(scratch: str, with_train: bool) -> dict[str, list[str]]:
    """Case name -> arguments of ``python``."""
    entry = ["-m", "xtuner.entry_point"]
    found = {
        "import xtuner": ["-c", "import xtuner"],
        "xtuner help": [*entry, "help"],
        "xtuner version": [*entry, "version"],
        "xtuner list-cfg": [*entry, "list-cfg"],
        "xtuner copy-cfg": [*entry, "copy-cfg", "demo_tiny_llama_full_alpaca", scratch],
        "xtuner list-dataset-format": [*entry, "list-dataset-format"],
        "xtuner train -h": [*entry, "train", "-h"],
        "xtuner train --bad-flag": [*entry, "train", "demo_tiny_llama_full_alpaca", "--bad-flag"],
    }
    if with_train:
        work = osp.join(scratch, "work")
        found[TRAIN_CASE] = [
            *entry,
            "train",
            "demo_tiny_llama_full_alpaca",
            "--work-dir",
            work,
            *TRAIN_OPTIONS,
        ]
    return found


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(
    tree: str, argv: list[str], env: dict, cwd: str, first_iter: bool
) -> tuple[float, float]:
    """Runs ``python ARGV`` with ``tree`` first on the path: (wall s, CPU s).

    With ``first_iter`` the clock stops at the first logged training iteration and the
    process is then stopped.
    """
    env = dict(env, PYTHONPATH=tree)
    cpu0 = _children_cpu()
    start = time.perf_counter()
    if first_iter:
        proc = subprocess.Popen(
            [sys.executable, *argv],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        tail: list[str] = []
        for line in proc.stdout:
            tail = [*tail[-30:], line]
            if FIRST_ITER.search(line):
                break
        else:
            proc.wait()
            raise RuntimeError(f"train ended without a logged iteration:\n{''.join(tail)}")
        wall = time.perf_counter() - start
        os.killpg(proc.pid, signal.SIGTERM)
        proc.stdout.close()
        proc.wait()
    else:
        out = subprocess.run(
            [sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True
        )
        wall = time.perf_counter() - start
        if out.returncode not in (0, 2):
            raise RuntimeError(f"{argv} failed:\n{out.stderr[-2000:]}")
    return wall, _children_cpu() - cpu0


def export_ref(ref: str, dest: str) -> str:
    """The tree of commit ``ref`` under ``dest`` (``git archive``); returns its short hash."""
    short = subprocess.check_output(
        ["git", "-C", REPO, "rev-parse", "--short", ref], text=True
    ).strip()
    os.makedirs(dest)
    archive = subprocess.Popen(["git", "-C", REPO, "archive", ref], stdout=subprocess.PIPE)
    subprocess.check_call(["tar", "-x", "-C", dest], stdin=archive.stdout)
    if archive.wait() != 0:
        raise RuntimeError(f"git archive {ref} failed")
    return short


def markdown(results: dict[str, dict[str, list[tuple[float, float]]]], names: dict) -> str:
    head = (
        f"| command | before ({names['before']}) s | after ({names['after']}) s "
        "| speed-up | CPU before s | CPU after s |\n|---|---|---|---|---|---|"
    )
    rows = [head]
    for case, runs in results.items():
        med = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
        rng = {k: f"{min(w for w, _ in v):.2f}-{max(w for w, _ in v):.2f}" for k, v in runs.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
        rows.append(
            f"| `{case}` | {med['before']:.2f} ({rng['before']}) | {med['after']:.2f} "
            f"({rng['after']}) | {med['before'] / med['after']:.1f}x | {cpu['before']:.2f} "
            f"| {cpu['after']:.2f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ref", default="1c2f940", help="the 'before' commit (default 1c2f940)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--no-train", action="store_true", help="light modes only")
    parser.add_argument("--out", default=None, help="append the Markdown table to this file")
    args = parser.parse_args()

    scratch = tempfile.mkdtemp(prefix="bench_cli_")
    try:
        trees = {"before": osp.join(scratch, "before"), "after": REPO}
        names = {"before": export_ref(args.ref, trees["before"]), "after": "this tree"}
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            TOKENIZERS_PARALLELISM="false",
            HF_HUB_OFFLINE="1",
            XTUNER_DEMO_DIR=osp.join(scratch, "demo"),
        )
        todo = cases(osp.join(scratch, "out"), not args.no_train)
        results = {case: {"before": [], "after": []} for case in todo}
        for round_ in range(args.repeat + 1):  # round 0: warm-up, not recorded
            for case, argv in todo.items():
                for side in ("before", "after"):
                    timing = run_once(trees[side], argv, env, scratch, case == TRAIN_CASE)
                    if round_:
                        results[case][side].append(timing)
                    shutil.rmtree(osp.join(scratch, "out"), ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    env_line = (
        f"{os.cpu_count()} CPUs, load average {load} at the end, python "
        f"{platform.python_version()}; medians of {args.repeat} rounds (range)"
    )
    cmd = "python benchmarks/bench_cli.py " + " ".join(sys.argv[1:])
    text = f"`{cmd}`\n\n{env_line}\n\n{markdown(results, names)}\n"
    print(text)
    if args.out:
        os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
