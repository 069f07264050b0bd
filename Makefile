# Distillery: `make run` starts the service on the embedded default; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU wheel of torch that lies on this machine's disk; installed before anything can pull a CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install run test lint format bench bench-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_PIN)"
	$(PIP) install --quiet -e '.[worker,dev]'
	touch $@

run: install
	$(VENV)/bin/distillery up

# Two test processes (pytest-xdist), each a whole file at a time and in order (a module's tests may build on
# each other's files); each has its own database, Redis prefix and DATA_DIR (tests/conftest.py). The schema
# fuzz runs on its own, in one process: its schemathesis cases share one test id, which xdist counts once.
TEST_WORKERS ?= 2
FUZZ := tests/api/test_fuzz.py
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --ignore=$(FUZZ)
	$(PY) -m pytest -n 0 $(FUZZ)

lint: install
	$(VENV)/bin/ruff check app workers distillery distillery_cli migrations tests bench
	$(VENV)/bin/ruff format --check app workers distillery distillery_cli migrations tests bench
	$(VENV)/bin/mypy app workers distillery distillery_cli

format: install
	$(VENV)/bin/ruff check --fix app workers distillery distillery_cli migrations tests bench
	$(VENV)/bin/ruff format app workers distillery distillery_cli migrations tests bench

# The GPU figures in one command and one file (needs 2+ CUDA devices; `--smoke` is the suite's CPU check).
bench-gpu: install
	$(PY) bench/gpu_run.py --out bench/results/gpu.json

clean:
	rm -rf $(VENV) .distillery .mypy_cache .ruff_cache .pytest_cache
