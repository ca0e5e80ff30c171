# memwatch developer and CI entry points. `make test` is what .ci/run runs.
#
# Every recipe line runs in bash with -e -u -o pipefail, so a failing command fails the target.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

export DEBIAN_FRONTEND := noninteractive

# The interpreter the venv is built from: python3.11 where it exists, python3 otherwise.
PY ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)

VENV     := .venv
VPY      := $(VENV)/bin/python
STAMP    := $(VENV)/.install.stamp
# Extra arguments for pytest, e.g. `make test-unit PYTEST_ARGS='-k route -x'`.
PYTEST_ARGS ?=
# Per-test timeout for `make soak` (the default of 300 s in pyproject.toml is for the normal suite).
SOAK_TIMEOUT ?= 7200
# Only lint directories that exist yet (ruff reports a missing path as an error).
LINT_PATHS := $(wildcard memwatch tests benchmarks grafana)

# Command -> Debian package that provides it. prometheus also brings promtool.
SYSTEM_DEPS := promtool:prometheus prometheus:prometheus chromium:chromium wrk:wrk amtool:prometheus-alertmanager

# Run pytest with the given arguments. pytest exits 5 when it collected no test; a run that
# tested nothing must not look green, so 5 is turned into a failure here.
define run_pytest
rc=0; $(VPY) -m pytest $(1) $(PYTEST_ARGS) || rc=$$?; \
if [ "$$rc" -eq 5 ]; then \
  echo "make: pytest collected no tests (exit 5): failing, a run that tests nothing is not a pass" >&2; \
  exit 1; \
fi; \
exit "$$rc"
endef

.PHONY: help venv system-deps lint typecheck test test-unit soak bench demo dashboard corpus clean

help:
	@echo "make demo         create .venv if needed and run the demo (python -m memwatch.demo)"
	@echo "make test         venv + Debian test tools, then lint, typecheck and the full pytest suite"
	@echo "make test-unit    pytest without the integration tests (no real servers)"
	@echo "make lint         ruff check"
	@echo "make typecheck    mypy --strict over memwatch"
	@echo "make corpus       the detection and advice corpora alone (part of make test)"
	@echo "make soak         long soak tests (MEMWATCH_SOAK=1 pytest -m soak)"
	@echo "make bench        benchmarks/run.py (installs the bench extra; BENCH_ARGS='--only scrape')"
	@echo "make venv         create .venv and pip install -e '.[test,all]'"
	@echo "make system-deps  apt-get install prometheus, chromium, wrk when missing (root only)"
	@echo "make clean        remove the venv, caches and build output"

venv: $(STAMP)

# Reinstalls only when the package metadata or build settings change.
$(STAMP): setup.cfg setup.py pyproject.toml memwatch/_speedups.c
	@if [ ! -x "$(VPY)" ]; then \
	  echo "Creating $(VENV) with $(PY) ($$($(PY) --version 2>&1))"; \
	  $(PY) -m venv $(VENV); \
	fi
	$(VPY) -m pip install --upgrade pip
	$(VPY) -m pip install -e '.[test,all]'
	@touch $@

# Installs what the integration tests need from Debian when it is missing. As root: one
# apt-get update, then one apt-get install. Otherwise: a note, and the tests that need a
# missing tool skip (or fail) saying which one.
system-deps:
	@missing=(); \
	for pair in $(SYSTEM_DEPS); do \
	  cmd="$${pair%%:*}"; pkg="$${pair#*:}"; \
	  if ! command -v "$$cmd" >/dev/null 2>&1; then \
	    case " $${missing[*]-} " in *" $$pkg "*) ;; *) missing+=("$$pkg") ;; esac; \
	  fi; \
	done; \
	if [ "$${#missing[@]}" -eq 0 ]; then \
	  echo "system-deps: promtool, prometheus, chromium and wrk are present"; \
	elif [ "$$(id -u)" -eq 0 ]; then \
	  echo "system-deps: installing $${missing[*]}"; \
	  apt-get update -q; \
	  apt-get install -y -q --no-install-recommends "$${missing[@]}"; \
	else \
	  echo "NOTE: missing Debian packages: $${missing[*]} (not root, so not installing them)." >&2; \
	  echo "NOTE: run 'sudo apt-get install --no-install-recommends $${missing[*]}';" \
	       "tests that need them will skip or fail saying so." >&2; \
	fi

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)

typecheck: venv
	$(VENV)/bin/mypy

test: venv system-deps lint typecheck
	@$(call run_pytest,)

# The detection and advice corpora alone (13 apps and 8 fixed twins under real servers, about
# 10 minutes); `make test` runs them too.
corpus: venv system-deps
	@$(call run_pytest,-m corpus tests/integration/test_detection_corpus.py tests/integration/test_advice_corpus.py)

test-unit: venv
	@$(call run_pytest,-m 'not integration')

soak: venv system-deps
	@export MEMWATCH_SOAK=1; $(call run_pytest,-m soak --timeout=$(SOAK_TIMEOUT))

BENCH_STAMP := $(VENV)/.bench.stamp

# The bench extra (the alternatives compared with memwatch), on top of the venv.
$(BENCH_STAMP): $(STAMP) setup.cfg
	$(VPY) -m pip install -e '.[test,all,bench]'
	@touch $@

# Extra arguments for benchmarks/run.py, e.g. `make bench BENCH_ARGS='--only scrape --out results'`.
BENCH_ARGS ?=

bench: venv system-deps $(BENCH_STAMP)
	@if [ -f benchmarks/run.py ]; then \
	  $(VPY) benchmarks/run.py $(BENCH_ARGS); \
	else \
	  echo "bench: benchmarks/run.py does not exist yet, nothing to run"; \
	fi

demo: venv
	$(VPY) -m memwatch.demo

dashboard: venv
	$(VPY) grafana/generate.py

clean:
	rm -rf $(VENV) build dist .eggs *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
