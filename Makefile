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
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache site dist build

.PHONY: bench bench-smoke bench-presence bench-resume bench-scale bench-scale-smoke bench-capacity

# Benchmarks against bare Starlette, then the resumption rows (issue 14) and the presence join
# storm (issue 15), each also alone below (not part of `make test`; see BENCHMARKS.md).
bench: install
	$(BIN)/python -m bench
	$(BIN)/python -m bench.resume
	$(BIN)/python -m bench.presence

# Presence join storm (issue 15): 2,000 clients in 2 s, diffs against the naive broadcast.
bench-presence: install
	$(BIN)/python -m bench.presence

# What session resumption costs: recording per message, resume latency, memory per detached session;
# memory registry and RedisRegistry (a private redis-server; skipped, said so, if not installed).
bench-resume: install
	$(BIN)/python -m bench.resume

# Seconds-long check that the benchmark harness works (numbers are not judged).
bench-smoke: install
	$(BIN)/python -m bench --smoke

# Scale (issue 17): 1k, 10k, 50k, 100k idle connections on one worker, bare vs wsession; writes
# bench/results/scale.{md,json} and the plots. An N above the hard RLIMIT_NOFILE is skipped
# (said so) and the largest N that fits is measured instead. A few minutes; not in `make test`.
bench-scale: install
	$(BIN)/python -m bench.scale

# The same harness at N = 200 and 1,000, no files written (CI; well under a minute).
bench-scale-smoke: install
	$(BIN)/python -m bench.scale --smoke

# Redis commands, bytes and CPU per RedisRegistry operation (a private redis-server): the
# inputs of the capacity model in BENCHMARKS.md.
bench-capacity: install
	$(BIN)/python -m bench.scale_redis --json bench/results/capacity.json

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

# Documentation site (issue 18): MkDocs + Material + mkdocstrings, built into site/ in strict
# mode, so a broken link, a missing page or an unresolved API reference fails the build. The
# `docs` extra is installed into .venv on first use; the build fetches nothing from the network.
# (NO_MKDOCS_2_WARNING silences Material's end-of-life banner; see docs/development.md.)
.PHONY: docs docs-serve dist wheel-smoke

DOCS_STAMP := $(VENV)/.docs-installed
PACKAGE_STAMP := $(VENV)/.package-installed

$(DOCS_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $@

$(PACKAGE_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[package]'
	touch $@

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The site at http://127.0.0.1:8001/, rebuilt on every change.
docs-serve: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict -a 127.0.0.1:8001

# The sdist and the wheel (built from the sdist, so a file the sdist misses is missed by the
# wheel too), checked by twine.
dist: $(PACKAGE_STAMP)
	rm -rf dist
	$(BIN)/python -m build --outdir dist .
	$(BIN)/twine check --strict dist/*

# Installs the wheel (not editable) into a fresh venv with the example and redis extras and
# runs the example app from that venv against it: a file missing from the package fails here.
wheel-smoke: dist
	$(BIN)/python scripts/wheel_smoke.py --python $(PYTHON) dist/*.whl

# Cross-worker send-by-id p50/p99 and broadcast to 400 clients on two workers, over a private
# single Redis and a private 3-master Redis Cluster (issue 17); ~1 min.
.PHONY: bench-redis
bench-redis: install
	$(BIN)/python -m bench.redis_latency
