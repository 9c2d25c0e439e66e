# Set-up is part of every target: a fresh machine with only Python needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench bench-anatomy gpu-check

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PYTHON=$(abspath $(PY)) bash scripts/demo.sh

# one pytest worker per core (at most 8; e.g. `make test TEST_WORKERS=1` for one process), longest tests first
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(min(8, len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1))")

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load

bench: $(STAMP)
	$(PY) bench/train_step.py --quick
	$(PY) bench/sampling.py --quick
	$(PY) bench/attention.py --quick
	$(PY) bench/flops.py --quick
	$(PY) bench/anatomy.py --quick -o bench/out/anatomy_quick

# the anatomy benchmark v2 at the protocol's scale (bench/PROTOCOL.md): plain, capacity-matched and anatomical LDM
# for each development seed, one record per task in bench/out/anatomy/records (commit them under bench/records/);
# `python bench/anatomy.py -o DIR --claim` runs the claim seeds, `--phantom v1` the first benchmark
bench-anatomy: $(STAMP)
	$(PY) bench/anatomy.py -o bench/out/anatomy

# every GPU measurement in one command (at most 8 minutes on one GPU): bench/out/gpu.json and gpu.md;
# `python bench/gpu_check.py --cpu-dry-run` runs the same code at toy sizes on the CPU (the tests do)
gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py
