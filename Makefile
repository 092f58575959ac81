# Skylift: two commands do all the set-up.
#   make demo   create .venv, install, run the demo on embedded defaults
#   make test   create .venv, install, run lint, type checks, import contracts and the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the test suite drives: mke2fs builds real ext4 images;
# postgresql provides initdb/pg_ctl for the throwaway server the hub tests start;
# libubootenv-tool (fw_printenv/fw_setenv) and grub-common (grub-editenv) check
# the agent's bootloader environments byte for byte; softhsm2, libengine-pkcs11-openssl
# and opensc (pkcs11-tool) give the agent's PKCS#11 tests a real token; chromium
# (/usr/bin/chromium) is the browser Playwright drives in the dashboard's tests.
TEST_DEBS ?= e2fsprogs postgresql libubootenv-tool grub-common softhsm2 dosfstools erofs-utils squashfs-tools \
	libengine-pkcs11-openssl opensc chromium
BENCH_DEBS ?= zstd e2fsprogs
DEMO_DEBS ?= e2fsprogs

# tuf-js (npm registry) checks the hub's TUF repositories as an independent client.
JS_INTEROP := tests/hub/interop/js
JS_STAMP := $(JS_INTEROP)/node_modules/.installed

.PHONY: all demo test check lint typecheck imports unit bench bench-poll bench-agent bench-dashboard setup clean

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

$(JS_STAMP): $(JS_INTEROP)/package-lock.json $(JS_INTEROP)/package.json
	@command -v node >/dev/null && command -v npm >/dev/null || scripts/ensure-debs nodejs npm
	@node -e 'const [a,b]=process.versions.node.split(".").map(Number);process.exit(a>20||(a===20&&b>=17)?0:1)' \
	  || { echo "tuf-js 5 needs Node.js >= 20.17 (found $$(node --version)): install Node 20 (NodeSource) or use Debian trixie" >&2; exit 1; }
	npm ci --prefix $(JS_INTEROP) --no-audit --no-fund
	@touch $@

unit: setup $(JS_STAMP)
	$(BIN)/pytest

test: lint typecheck imports unit

demo: setup
	scripts/ensure-debs $(DEMO_DEBS)
	$(BIN)/python -m skylift.demo .demo

bench: setup
	scripts/ensure-debs $(BENCH_DEBS)
	$(BIN)/python bench/bundle_create.py $(BENCH_ARGS)

# The gateway's poll path against nginx over mutual TLS (the bench installs nginx,
# PostgreSQL and what its C load generator builds with). BENCH_ARGS=--quick for a smoke run.
bench-poll: setup
	$(BIN)/python bench/poll.py $(BENCH_ARGS)

# Agent install from a local hub (MB/s, peak RSS) against cp of the same 1 GiB image.
# BENCH_ARGS=--quick for a 128 MiB smoke run.
bench-agent: setup
	scripts/ensure-debs $(BENCH_DEBS)
	$(BIN)/python bench/agent_install.py $(BENCH_ARGS)

# Delta download bytes on make-corpus.sh's Debian image pairs (~/.cache/skylift-bench-corpus,
# or CORPUS=DIR), with zstd, casync, zchunk, xdelta3 and OSTree measured in the same run.
# Writes bench/results/delta-DATE.md. BENCH_ARGS=--quick for the small tar pair only.
# The corpus is built first when missing, by the team's script (about 1.5 GB, from the
# Debian mirror; CORPUS_SCRIPT=PATH where it lives elsewhere).
DELTA_BENCH_DEBS ?= zstd casync zchunk xdelta3 ostree squashfs-tools e2fsprogs tar
CORPUS_SCRIPT ?= ../shared/bench/make-corpus.sh
.PHONY: bench-delta
bench-delta: setup
	scripts/ensure-debs $(DELTA_BENCH_DEBS)
	@[ -d "$${CORPUS:-$$HOME/.cache/skylift-bench-corpus}/img" ] || { \
	  [ -f "$(CORPUS_SCRIPT)" ] || { echo "no corpus and no $(CORPUS_SCRIPT) to build it: set CORPUS_SCRIPT" >&2; exit 1; }; \
	  bash "$(CORPUS_SCRIPT)" all; }
	$(BIN)/python bench/delta.py $(BENCH_ARGS)

# Every dashboard page's server time at 100k devices and 1M events, against a bare
# SELECT and a trivial page in the same run. BENCH_ARGS=--quick for 10k / 100k.
bench-dashboard: setup
	$(BIN)/python bench/dashboard.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(JS_INTEROP)/node_modules .mypy_cache .pytest_cache .ruff_cache build src/*.egg-info
