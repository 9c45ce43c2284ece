# wsession: every target creates the virtualenv it needs, so a fresh clone works.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/python -m example_app

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

.PHONY: bench bench-smoke

# Benchmarks against bare Starlette (not part of `make test`; see BENCHMARKS.md).
bench: install
	$(BIN)/python -m bench

# Seconds-long check that the benchmark harness works (numbers are not judged).
bench-smoke: install
	$(BIN)/python -m bench --smoke
