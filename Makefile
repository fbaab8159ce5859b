# Quick start: `make demo` and `make test` each set up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SCALE ?= 1

.PHONY: demo test faults cluster-tests bench-tests lint setup clean bench

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

# Lint first: it takes a second and fails fast. Four pytest processes, each with its own Ray:
# the main suite, and beside it a second line of the fault-injection suite, the multi-node and
# autoscaler suite (tests/faults/conftest.py, tests/cluster/conftest.py) and the dry run of the
# GPU check (tests/benchmarks). Ray's start-ups and waits leave the cores idle often enough that
# the two lines together take little more than the main suite alone (docs/development.md). The
# main suite's progress shows live; the second line's output follows it (also in .test-logs/).
test: lint
	@mkdir -p .test-logs
	@echo "make test: tests/faults, tests/cluster, tests/benchmarks run beside the main suite; their output follows it"
	@( $(MAKE) --no-print-directory faults && $(MAKE) --no-print-directory cluster-tests && \
	   $(MAKE) --no-print-directory bench-tests ) > .test-logs/second-line.log 2>&1 & side=$$!; \
	WANDB_MODE=disabled $(BIN)/python -m pytest -q --durations=15 tests --ignore=tests/faults \
	    --ignore=tests/cluster --ignore=tests/benchmarks; main=$$?; \
	wait $$side; other=$$?; cat .test-logs/second-line.log; \
	echo "make test: main suite exit $$main, fault, multi-node and benchmark suites exit $$other"; \
	[ $$main -eq 0 ] && [ $$other -eq 0 ]

faults: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q --durations=10 tests/faults

# Multi-node and autoscaler tests: each starts its own Ray cluster on 127.0.0.1, in its own
# pytest process.
cluster-tests: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q --durations=10 tests/cluster

# The benchmark scripts' dry runs (benchmarks/gpu_check.py --dry).
bench-tests: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q --durations=10 tests/benchmarks

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	for f in benchmarks/*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf runs .pytest_cache .test-logs
