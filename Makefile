# Two commands set up a fresh machine (see README):
#   make run   - install into .venv and start the dashboard on the embedded default, on this
#                computer only (ADDRESS=127.0.0.1; `make run ADDRESS=0.0.0.0` opens it to the
#                network: set FMMTC_PASSWORD first)
#   make test  - install into .venv (plus test tools) and run the whole test suite (CI)
#   make test-fast - the daily tier: no slow, PostgreSQL or browser tests (under 2 minutes)
#   make typecheck - mypy on fmmtc_core (settings in pyproject.toml [tool.mypy]; CI runs it)
# pip only (never uv/poetry): requirements.txt pins torch==2.13.0, which pip takes from local disk
# on our machines instead of downloading a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8501
ADDRESS ?= 127.0.0.1
PYTEST_ARGS ?=

.PHONY: run test test-fast typecheck install install-dev bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt -e .
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-dev.txt -e .
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/streamlit run app.py --server.headless true --server.address $(ADDRESS) --server.port $(PORT)

test: install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install-dev
	$(BIN)/python -m pytest -m "not slow and not postgres and not browser" $(PYTEST_ARGS)

typecheck: install-dev
	$(BIN)/mypy

bench: install-dev
	$(BIN)/python bench/bench_parcellate.py
	$(BIN)/python bench/bench_cli.py

clean-venv:
	rm -rf $(VENV)
