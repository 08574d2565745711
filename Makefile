# Everyday commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
TORCH_VERSION ?= 2.13.0
DEMO_ROUTERS ?= topk,spectra,switch_top2,hash
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: help setup demo test test-fast lint clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install (torch first, by exact version, unless one is there)

$(STAMP): pyproject.toml
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	@$(PYTHON) -m pip install -q --upgrade pip
	@# A GPU host installs its own CUDA torch into .venv first; then this line installs nothing.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: setup  ## tiny multirun over the routers on the bundled corpus, then the comparison table
	$(PYTHON) train.py -m experiment=demo router=$(DEMO_ROUTERS)
	$(PYTHON) -m spectra.analysis table outputs/demo

test: setup  ## the whole suite (slow end-to-end tests included)
	$(PYTHON) -m pytest -q

test-fast: setup  ## unit tests only
	$(PYTHON) -m pytest -q -m "not slow"

lint: setup  ## ruff
	$(PYTHON) -m ruff check src tests train.py

clean:  ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
