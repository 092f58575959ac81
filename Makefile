# Skylift: two commands do all the set-up.
#   make demo   create .venv, install, run the demo on embedded defaults
#   make test   create .venv, install, run lint, type checks, import contracts and the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the test suite drives: mke2fs builds real ext4 images;
# postgresql provides initdb/pg_ctl for the throwaway server the hub tests start.
TEST_DEBS ?= e2fsprogs postgresql
BENCH_DEBS ?= zstd e2fsprogs
DEMO_DEBS ?= e2fsprogs

.PHONY: all demo test check lint typecheck imports unit bench setup clean

all: test

$(BIN)/python:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || scripts/ensure-debs python3-venv
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[hub,dev]'
	@touch $@

setup: $(STAMP)
	@[ -z "$(TEST_DEBS)" ] || scripts/ensure-debs $(TEST_DEBS)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: setup
	$(BIN)/mypy

imports: setup
	$(BIN)/lint-imports

unit: setup
	$(BIN)/pytest

test: lint typecheck imports unit

demo: setup
	scripts/ensure-debs $(DEMO_DEBS)
	$(BIN)/python -m skylift.demo .demo

bench: setup
	scripts/ensure-debs $(BENCH_DEBS)
	$(BIN)/python bench/bundle_create.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build src/*.egg-info
