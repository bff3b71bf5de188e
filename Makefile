# kvstore: `make run` starts a local three-node cluster, `make test` runs the whole suite.
# Both set up .venv on a fresh machine (Python >= 3.11 with venv and pip is all they need).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two stamps: `make run` needs only the runtime dependencies; tests and benchmarks add theirs.
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
# pip's and setuptools' chatter about an editable install is noise to someone starting a cluster.
PIP_INSTALL := $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-warn-script-location
PIP_QUIET := 2>&1 | grep -v -e '^WARNING: Location' -e BuildBackendWarning -e '^ *!!' -e '^ *\*\*\*' -e 'Please be careful' -e 'name as your package' -e 'with strategy, WheelFile' -e '^ *$$' || true

.PHONY: all setup setup-runtime run test test-fast lint typecheck chaos bench sim fuzz-http clean

all: test

$(BIN)/python:
	@echo "creating $(VENV) with $(PYTHON)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip $(PIP_QUIET)

$(RUNTIME_STAMP): pyproject.toml | $(BIN)/python
	@echo "installing kvstore and its runtime dependencies into $(VENV)"
	@$(PIP_INSTALL) -e . $(PIP_QUIET)
	@$(BIN)/python -c 'import kvstore, aiohttp, msgpack'
	@touch $(RUNTIME_STAMP)

$(STAMP): pyproject.toml | $(BIN)/python
	@echo "installing kvstore with its test and benchmark dependencies into $(VENV)"
	@$(PIP_INSTALL) -e '.[test,bench]' $(PIP_QUIET)
	@$(BIN)/python -c 'import kvstore, aiohttp, msgpack, pytest, hypothesis'
	@touch $(STAMP) $(RUNTIME_STAMP)

setup-runtime: $(RUNTIME_STAMP)

setup: $(STAMP)

# `make run TLS=1`: the same cluster with TLS on both ports (a development CA in data/certs).
run: setup-runtime
	$(BIN)/kvstore cluster $(if $(TLS),--tls)

lint: setup
	$(BIN)/ruff check kvstore tests bench
	$(BIN)/mypy kvstore

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
