# Quick start: `make demo` and `make test` each set up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SCALE ?= 1

.PHONY: demo test faults cluster-tests lint setup clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall when the project's dependencies change. A download cut off midway (torch is
# several GB) resumes rather than failing the whole set-up.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --resume-retries 20 -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python jobs/demo.py --out runs/demo --scale $(SCALE)

# Lint first: it takes a second and fails fast. The fault-injection suite runs in its own
# pytest process, and so do the multi-node/autoscaler tests: they start and kill their own Ray
# clusters (tests/faults/conftest.py, tests/cluster/conftest.py).
test: lint
	WANDB_MODE=disabled $(BIN)/python -m pytest -q --durations=15 tests --ignore=tests/faults --ignore=tests/cluster
	$(MAKE) faults
	$(MAKE) cluster-tests

faults: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q --durations=10 tests/faults

# Multi-node and autoscaler tests: each starts its own Ray cluster on 127.0.0.1. Run them in
# their own pytest process, after the main suite (never beside another Ray user).
cluster-tests: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q --durations=10 tests/cluster

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for f in benchmarks/*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf runs .pytest_cache
