# `make test` and `make tour` bootstrap .venv from nothing: the CPU build of torch first (when no torch is
# importable), then the package with its dev extras.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CELL_TIMEOUT ?= 900  # per cell; the longest (a stand-in SDXL sweep) takes about 2 minutes on a quiet 2-core CPU

.PHONY: setup test tour clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# pytest exits 5 when it collects no test: treat that as the failure it is.
# Notebooks three times: on the toy (the claims, recorded in build/claims and printed as a table at the end of
# the toy run), then the real-model branches on random-weight stand-ins of
# SD1.5 and SDXL (DIFFNB_STANDIN=1: real structure, 1/4 size, <= 10 steps), so the Colab path cannot rot.
NBMAKE = $(BIN)/python -m pytest -q --nbmake --nbmake-timeout=$(CELL_TIMEOUT) notebooks/

test: setup
	$(BIN)/python -m pytest tests -q
	rm -rf build/claims
	DIFFNB_MODEL=toy DIFFNB_RESULTS=$(CURDIR)/build/claims $(NBMAKE)
	$(BIN)/python -m diffnb.tour --summarize build/claims
	DIFFNB_MODEL=sd15 DIFFNB_STANDIN=1 $(NBMAKE)
	DIFFNB_MODEL=sdxl DIFFNB_STANDIN=1 $(NBMAKE)

tour: setup
	$(BIN)/python -m diffnb.tour

clean:
	rm -rf build
