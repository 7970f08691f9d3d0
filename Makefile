# `make demo` and `make test` set everything up themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xtuner-installed
# One thread per process: torchrun tests run 2 processes on 2 cores, and OpenMP threads
# that outnumber free cores spin-wait (measured: 5 s instead of 0.16 s per demo iteration).
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-all test-fast lint format demo bench gpu-check clean

$(STAMP): setup.py requirements/*.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q -c requirements/constraints.txt torch
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[all,tests]"
	touch $@

install: $(STAMP)

# CI's suite: everything but the long corners marked slow_all (test-all runs those too);
# the 25 longest tests are listed at the end, to keep the suite under its time budget.
test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25 -m "not slow_all" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -ra tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow and not multiproc and not slow_all" tests

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: $(STAMP)
	$(PY) -m xtuner.demo.run

# The small points of each benchmark (minutes); benchmarks/README.md has the full grids.
bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py --tokens 2048 --vocab 32768 --hidden 2048 --dtype fp32
	$(PY) benchmarks/bench_train_step.py
	$(PY) benchmarks/bench_data.py

# On a machine with one CUDA GPU (minutes); prints the table for docs/en/performance.md.
gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py --out gpu_check.md

clean:
	rm -rf $(VENV) work_dirs build *.egg-info
