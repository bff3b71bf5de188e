# kvstore: `make run` starts a local three-node cluster, `make test` runs the whole suite.
# Both set up .venv on a fresh machine (Python >= 3.11 with venv and pip is all they need).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all setup run test test-fast lint typecheck chaos bench sim clean

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

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
