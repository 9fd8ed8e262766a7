# Two commands for a fresh machine:  `make demo` (set up + run the main job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test bench clean-run

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The main job on the bundled demo data: the DVC pipeline in dvc.yaml.
demo: setup
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

# All test tiers (data, code, model). pytest's exit code 5 (no tests collected) is not a failure.
test: setup
	$(BIN)/python -m pytest -q || [ $$? -eq 5 ]

# Benchmarks (figures go to BENCHMARKS.md with the commands that produced them).
bench: setup
	$(BIN)/python benchmarks/bench_text_path.py
	$(BIN)/python benchmarks/bench_kv_cache.py
	$(BIN)/python benchmarks/bench_closed_set.py

# Remove run-time outputs of the demo (never in git).
clean-run:
	rm -rf data artifacts metrics dvc.lock
