# trainyard — `make demo` and `make test` are the two commands a newcomer runs.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install protos test test-fast demo bench lint up down status clean

install: $(STAMP)

# Re-installs when pyproject.toml changes. Debian's prometheus and pushgateway are real servers the
# tests start; pip cannot provide them.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	@if ! command -v prometheus >/dev/null || ! command -v prometheus-pushgateway >/dev/null; then \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus prometheus-pushgateway; \
	fi
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

protos: install
	$(PY) -m shared.protogen

test: install
	$(PY) -m pytest $(PYTEST_ARGS) tests

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS) tests

demo: install
	$(PY) -m cli.demo

bench: install
	$(PY) -m bench

lint: install
	$(VENV)/bin/ruff check cli shared services tests bench
	$(VENV)/bin/hadolint services/*/Dockerfile

up: install
	$(VENV)/bin/trainyard up

status: install
	$(VENV)/bin/trainyard status

down:
	$(VENV)/bin/trainyard down

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
