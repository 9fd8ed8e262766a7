# Two commands for a fresh machine:  `make demo` (set up + run the main job)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test test-fast lint bench clean-run

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

# The main job on the bundled demo data: the DVC pipeline in dvc.yaml, then one table to read
# (`dvc metrics show --md` still prints every metric file).
demo: setup
	$(BIN)/dvc repro
	$(BIN)/galen summary

# The code's rules: ruff (pyflakes, import order, bugbear, pyupgrade, banned top-level imports),
# import-linter's layering contracts, mypy on galen.model. Seconds; part of every test target.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	mkdir -p build/typecheck/galen && ln -sfn ../../../model build/typecheck/galen/model
	$(BIN)/mypy

# All test tiers (data, code, model, serve; learning, cluster and fault tests included): what CI runs.
# pytest's exit code 5 (no tests collected) is not a failure.
test: lint
	$(BIN)/python -m pytest -q || [ $$? -eq 5 ]

# Every tier but the long learning, cluster and fault tests (marked `slow`): the loop while you work.
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" || [ $$? -eq 5 ]

# Benchmarks (figures go to BENCHMARKS.md with the commands that produced them).
bench: setup
	$(BIN)/python benchmarks/bench_text_path.py
	$(BIN)/python benchmarks/bench_kv_cache.py
	$(BIN)/python benchmarks/bench_closed_set.py

# Remove run-time outputs of the demo (never in git).
clean-run:
	rm -rf data artifacts metrics dvc.lock
