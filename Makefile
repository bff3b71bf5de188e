# kvstore: `make run` starts a local three-node cluster, `make test` runs the whole suite.
# Both set up .venv on a fresh machine (Python >= 3.11 with venv and pip is all they need).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all setup run test test-fast lint typecheck chaos bench sim fuzz-http clean

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,bench]' 2>&1 | grep -v -e '^WARNING: Location' -e BuildBackendWarning || true
	$(BIN)/python -c 'import kvstore, aiohttp, msgpack, pytest, hypothesis'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/kvstore cluster

lint: setup
	$(BIN)/ruff check kvstore tests bench
	$(BIN)/mypy kvstore/raft kvstore/storage kvstore/kv kvstore/codec.py kvstore/errors.py kvstore/replica.py kvstore/sim kvstore/verify kvstore/chaos

typecheck: lint

test: setup lint
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 tests

test-fast: setup
	$(BIN)/python -m pytest -q -x -m "not slow" tests

sim: setup
	$(BIN)/python -m kvstore.sim --seeds 2000

chaos: setup
	$(BIN)/kvstore chaos --matrix full

bench: setup
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/failover.py --trials 20 --faults kill,term,pause

# schemathesis over /v1/openapi.json of a local node, every check (a few minutes; not part of
# `make test`). schemathesis lives in its own virtualenv: it is not a project dependency.
FUZZ_VENV := .venv-fuzz
fuzz-http: setup
	test -x $(FUZZ_VENV)/bin/schemathesis || { $(PYTHON) -m venv $(FUZZ_VENV) && \
		$(FUZZ_VENV)/bin/python -m pip install --quiet 'schemathesis>=4,<5'; }
	$(BIN)/python bench/fuzz_http.py --schemathesis $(FUZZ_VENV)/bin/schemathesis

clean:
	rm -rf $(VENV) $(FUZZ_VENV) .pytest_cache .mypy_cache .ruff_cache
