# xdrive: `make demo` and `make test` do all set-up on a fresh Debian/Ubuntu machine as root.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
N      ?= 20

.PHONY: setup test lint demo bench e2e chaos clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/install-deps.sh
	bash scripts/install-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(BIN)/pytest -q -ra

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	bash scripts/typecheck.sh

demo: setup
	$(BIN)/python -m xdrive.sandbox.demo

bench: setup
	$(BIN)/python bench/run.py

e2e: setup
	$(BIN)/pytest -q -ra -m e2e tests/e2e

chaos: setup
	$(BIN)/python -m xdrive.sandbox.chaos --cycles $(N)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache bench/results
