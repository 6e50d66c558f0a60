# gpujobq: `make up` runs the whole system locally; `make test` runs the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test bench lint venv clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "gpujobq needs Python >= 3.11 (set PYTHON=python3.X)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

venv: $(STAMP)

up: $(STAMP)
	@scripts/up.sh

test: $(STAMP)
	$(BIN)/python -m pytest

# The benchmark harness (docs/benchmarks.md): under 10 minutes on 2 cores, never in CI.
# make bench ARGS=--long (B8 with 100k jobs), ARGS='--only B3,B8 --no-doc'.
bench: $(STAMP)
	$(BIN)/python -m tests.bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
