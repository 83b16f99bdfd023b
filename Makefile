# Two commands do all set-up on a fresh machine (Python 3.11, Node 20, git):
#   make run   - install, start Azurite + the local model server + the local Functions host
#   make test  - install, lint, run every test (about 4 minutes on 2 cores; a first install adds about a minute)
#   make test-fast - the unit layer only: no Azurite, no model server, no host, no OCR (under 30 s)
PY ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast lint format bench clean

install: $(STAMP) node_modules/.installed

$(BIN)/python:
	$(PY) -c 'import sys; assert sys.version_info[:2] >= (3, 11), "Python 3.11+ is required, found " + sys.version'
	$(PY) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: install
	$(BIN)/python -m local.stack

# Integration tests mostly wait (on a quota window, a blob poll, a host restart), so more workers than
# cores pay off. Each worker starts its own stack; a module with a private stack or server runs on one
# worker as a unit, and tests marked `long` start first (tests/conftest.py).
TEST_WORKERS ?= 3
# Byte-code caches (git-ignored __pycache__) spare each xdist worker and each stack process another compile
# of the project and another rewrite of the tests' asserts (~5 s of CPU each), whatever the shell says.
test test-fast: export PYTHONDONTWRITEBYTECODE :=

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=30

# `integration` covers every test that needs a server or OCR (tests/conftest.py marks them by fixture
# and fails an unmarked test that starts a process or loads OCR).
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -m "not integration" -n 2 -p no:schemathesis

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: install
	$(BIN)/python -m bench.optimize
	$(BIN)/python -m bench.throughput

clean:
	rm -rf .local drop-results .pytest_cache .ruff_cache
