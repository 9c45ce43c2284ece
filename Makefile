# wsession: every target creates the virtualenv it needs, so a fresh clone works.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run run-cluster test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: install
	$(BIN)/python -m example_app

# Two workers of the example on one Redis (a private redis-server unless WSESSION_REDIS_URL).
run-cluster: install
	$(BIN)/python -m example_app.cluster

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

.PHONY: bench bench-smoke bench-presence

# Benchmarks against bare Starlette (not part of `make test`; see BENCHMARKS.md).
bench: install
	$(BIN)/python -m bench

# Presence join storm (issue 15): 2,000 clients in 2 s, diffs against the naive broadcast.
bench-presence: install
	$(BIN)/python -m bench.presence

# Seconds-long check that the benchmark harness works (numbers are not judged).
bench-smoke: install
	$(BIN)/python -m bench --smoke

# Conformance (issue 3): Starlette's and uvicorn's own WebSocket tests, run as published and
# then with every app wrapped by wsession; outcomes must match test by test. Downloads the
# sdists and builds a separate venv under .cache/conformance/ (git-ignored) on first use.
CONF := .cache/conformance
CONF_VENV := $(CONF)/venv
CONF_STAMP := $(CONF_VENV)/.installed
CONF_STARLETTE := 1.10.0
CONF_UVICORN := 0.54.0
CONF_SRC := $(CONF)/src/.unpacked-$(CONF_STARLETTE)-$(CONF_UVICORN)
CONF_RUN := $(CONF_VENV)/bin/python conformance/run.py --cache $(CONF) \
	--starlette $(CONF_STARLETTE) --uvicorn $(CONF_UVICORN)

.PHONY: conformance conformance-selftest

conformance: install $(CONF_STAMP) $(CONF_SRC)
	$(CONF_RUN) --selftest quick

# Every deliberate break against both full suites (several minutes).
conformance-selftest: $(CONF_STAMP) $(CONF_SRC)
	$(CONF_RUN) --selftest full

$(CONF_STAMP): conformance/requirements.txt pyproject.toml
	rm -rf $(CONF_VENV)
	$(PYTHON) -m venv $(CONF_VENV)
	$(CONF_VENV)/bin/python -m pip install -qq -r conformance/requirements.txt
	$(CONF_VENV)/bin/python -m pip install -qq --no-deps -e .
	touch $@

$(CONF_SRC): | $(CONF_STAMP)
	rm -rf $(CONF)/sdist $(CONF)/src
	$(CONF_VENV)/bin/python -m pip download -qq --no-deps --no-binary :all: -d $(CONF)/sdist \
		starlette==$(CONF_STARLETTE) uvicorn==$(CONF_UVICORN)
	mkdir -p $(CONF)/src
	for f in $(CONF)/sdist/*.tar.gz; do tar xzf "$$f" -C $(CONF)/src || exit 1; done
	touch $@
