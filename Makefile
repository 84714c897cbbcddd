# The two commands of the README: `make demo` (the local-chain demo) and `make test`.
# Both set everything up from a fresh clone: a Python venv and the npm packages (anvil, Uniswap V2).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_PY := $(VENV)/.installed
STAMP_NODE := node_modules/.installed

.PHONY: setup lint test test-fast demo bench clean

setup: $(STAMP_PY) $(STAMP_NODE)

$(STAMP_PY): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(STAMP_NODE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Lint and type-check the whole package (configured in pyproject.toml); `make test` runs them first.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -ra

# The inner loop (about a minute): the unit tests, no anvil, no Dagster daemon.
test-fast: lint
	$(PY) -m pytest -q -m "not slow"

demo: setup
	./scripts/demo.sh

bench: setup
	$(PY) bench/backfill.py

clean:
	rm -rf .devnet data .dagster_home
