# One command each: `make demo` sets up and runs the main job; `make test` sets up and runs every test.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench lint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	# torch==2.13.0 first: the local CPU wheel (any other version pulls GBs of CUDA packages).
	$(PYTHON) -m pip install --quiet torch==2.13.0 -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PYTHON) -m simulations.one_shot

test: setup
	$(PYTHON) -m pytest

test-fast: setup
	$(PYTHON) -m pytest -m "not slow"

bench: setup
	$(PYTHON) -m simulations.benchmarks.fusion_benchmark

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
