# `make test` and `make tour` bootstrap .venv from nothing: the CPU build of torch first (when no torch is
# importable), then the package with its dev extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CELL_TIMEOUT ?= 300

.PHONY: setup test tour clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# pytest exits 5 when it collects no test: treat that as the failure it is.
test: setup
	$(BIN)/python -m pytest tests -q
	$(BIN)/python -m pytest -q --nbmake --nbmake-timeout=$(CELL_TIMEOUT) notebooks/

tour: setup
	$(BIN)/python -m diffnb.tour

clean:
	rm -rf build
