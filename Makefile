# Everyday commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
LOCK := requirements/lock.txt
LATEST_VENV ?= .venv-latest
TORCH_VERSION ?= 2.13.0
DEMO_ROUTERS ?= topk,spectra,switch_top2,hash
export WANDB_MODE ?= offline
export TOKENIZERS_PARALLELISM ?= false
# Hub access: offline for the bundled corpus and the tests; on for SCALE=paper (SmolLM2, smoltalk
# are downloaded once into the Hugging Face cache). An HF_HUB_OFFLINE in the environment wins.
export HF_HUB_OFFLINE ?= $(if $(filter paper,$(SCALE)),0,1)

SCALE ?= cpu_tiny
LAUNCHER ?= basic
SWEEP_ARGS ?=
SWEEP = $(PYTHON) train.py -m +sweep=$(1) scale=$(SCALE) hydra/launcher=$(LAUNCHER) $(SWEEP_ARGS)

.PHONY: help setup demo test test-fast lint clean sweep-A sweep-B sweep-C sweep-D sweep-E sweep-ablations sweep-baselines

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv and install the committed lock: spectra[dev,eval] (torch first, by exact version, unless one is there)

# The lock (requirements/lock.txt) pins every package the suite passed with, transitive ones
# included, as pip constraints; torch is pinned here by TORCH_VERSION instead, because a GPU host
# installs its own CUDA build of it first. `make lock` regenerates the lock from the newest
# releases the pyproject ranges allow; `make test-latest` runs the suite on those without
# touching the lock. Re-running `make setup` changes nothing; check_lock.py proves the result.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PYTHON) || python3 -m venv $(VENV)
	@$(PYTHON) -m pip install -q -c $(LOCK) pip
	@# A GPU host installs its own CUDA torch into .venv first; then this line installs nothing.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q -c $(LOCK) torch==$(TORCH_VERSION)
	@$(PYTHON) -m pip install -q -c $(LOCK) setuptools wheel
	$(PYTHON) -m pip install -q --no-build-isolation -c $(LOCK) -e '.[dev,eval]'
	@$(PYTHON) requirements/check_lock.py $(LOCK)
	@touch $(STAMP)

# A separate venv with the newest releases the pyproject ranges allow (no lock), rebuilt each time.
.PHONY: latest-venv test-latest lock
latest-venv:
	rm -rf $(LATEST_VENV)
	python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LATEST_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(LATEST_VENV)/bin/python -m pip install -q --no-build-isolation -e '.[dev,eval]'

test-latest: latest-venv  ## the whole suite on the newest upstream releases (in .venv-latest; the lock is untouched)
	SPECTRA_UNLOCKED=1 $(LATEST_VENV)/bin/python -m pytest -q

lock: latest-venv  ## re-resolve the newest releases into requirements/lock.txt; then run `make test`
	@{ echo "# pip constraints: every package of spectra[dev,eval], transitive ones included, at the versions the"; \
	  echo "# suite passed with. Written by \`make lock\` ($$(date -u +%Y-%m-%d), Python $$($(LATEST_VENV)/bin/python -c 'import platform; print(platform.python_version())'))."; \
	  echo "# torch is pinned by TORCH_VERSION in the Makefile ($(TORCH_VERSION)), not here: GPU hosts bring their own build."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v -i '^torch==' | LC_ALL=C sort -f; } > $(LOCK).tmp
	@mv $(LOCK).tmp $(LOCK)
	@echo "wrote $(LOCK); now run the whole suite on it: make test"

demo: setup  ## tiny multirun over the routers on the bundled corpus, then the comparison table
	$(PYTHON) train.py -m experiment=demo router=$(DEMO_ROUTERS)

sweep-A: setup  ## Sweep A: quota on/off x capacity factor (SCALE=cpu_tiny|paper LAUNCHER=basic|local|slurm)
	$(call SWEEP,A)
sweep-B: setup  ## Sweep B: Sinkhorn epsilon x iterations x log-domain
	$(call SWEEP,B)
sweep-C: setup  ## Sweep C: OSR repulsion weight
	$(call SWEEP,C)
sweep-D: setup  ## Sweep D: routing entropy coefficient
	$(call SWEEP,D)
sweep-E: setup  ## Sweep E: sequence length x {full, -GRU}
	$(call SWEEP,E)
sweep-ablations: setup  ## the ablation grid (paper Table 7)
	$(call SWEEP,ablations)
sweep-baselines: setup  ## SPECTRA vs Switch top-1/top-2, Expert Choice, Hash, top-k, dense
	$(call SWEEP,baselines)

# The paper's tables from real runs (results/plan.yaml; results/README.md). `make results` trains
# every unfinished cell (the dense bases first), WORKERS at a time, commits each finished cell's
# small outputs (RESULTS_COMMIT=0: don't), then writes the tables, figures, index.html and the
# verdicts. Stop it any time; re-running resumes. `make results-status` shows how far it is.
WORKERS ?= 2
RESULTS_COMMIT ?= 1
RESULTS_RUN = $(PYTHON) -m spectra.results run --workers $(WORKERS) $(if $(filter 0,$(RESULTS_COMMIT)),--no-commit)
.PHONY: base-model results results-status results-report results-verify
# results-verify retrains the committed cells CELLS names (shell patterns; default one baseline)
# into outputs/verify/ and compares: bit-identical on this kind of machine, else within seed noise.
CELLS ?= baselines/router=topk,seed=0
VERIFY_ARGS ?=
base-model: setup  ## train the dense base models every results cell upcycles from (cached: outputs/base/)
	$(RESULTS_RUN) --bases-only
results: setup  ## every cell of results/plan.yaml (hours on 2 cores; resumable) + tables/figures/verdicts
	@# The report is written even when some cell failed (its row shows it); the exit status is the run's.
	@status=0; $(RESULTS_RUN) || status=$$?; $(PYTHON) -m spectra.results report || status=$$?; exit $$status
results-status: setup  ## cells done / failed / incomplete / not started per results family
	$(PYTHON) -m spectra.results status
results-report: setup  ## tables, figures, results/index.html and README verdicts from the cells done so far
	$(PYTHON) -m spectra.results report
results-verify: setup  ## retrain committed cells (CELLS='sweep_B/*' ...) and compare with their committed numbers
	$(PYTHON) -m spectra.results verify $(foreach c,$(CELLS),'$(c)') $(VERIFY_ARGS)

# Optuna searches (hydra/sweeper=spectra_optuna): TRIALS is the study's target; re-running tops it up.
# Several workers: start the same command several times with STORAGE=journal:///shared/x.log or
# STORAGE=postgresql://user:pass@host/db (and the same sweep).
TRIALS ?=
STORAGE ?=
SEARCH = $(call SWEEP,search_$(1)) $(if $(TRIALS),hydra.sweeper.n_trials=$(TRIALS)) $(if $(STORAGE),"hydra.sweeper.storage='$(STORAGE)'")
.PHONY: search-osr search-quota search-router search-pareto
search-osr: setup  ## Optuna: repulsion, hinge, Sinkhorn epsilon/iterations (TRIALS=20 STORAGE=...)
	$(call SEARCH,osr)
search-quota: setup  ## Optuna: quota capacity factor
	$(call SEARCH,quota)
search-router: setup  ## Optuna: GRU size, routing dim, entropy coef, router/expert LRs
	$(call SEARCH,router)
search-pareto: setup  ## Optuna multi-objective: eval loss vs eval load CV (NSGA-II), Pareto front
	$(call SEARCH,pareto)

# `make report` reads SWEEPS: by default the newest REPORT_LATEST sweep directories (those holding
# Hydra's multirun.yaml) under outputs/, e.g. outputs/demo, outputs/sweeps/C/cpu_tiny; choose with
# `make report SWEEPS="outputs/sweeps/A/cpu_tiny outputs/sweeps/ablations/cpu_tiny"`.
REPORT_LATEST ?= 5
SWEEPS ?= $(shell test -x $(PYTHON) && $(PYTHON) -m spectra.analysis latest outputs --count $(REPORT_LATEST))
.PHONY: report
report: setup  ## tables (md/tex/csv) + figures of the latest sweeps -> outputs/report/index.md
	@test -n "$(strip $(SWEEPS))" || { echo "no sweep under outputs/: run make demo or a sweep, or pass SWEEPS=dir..." >&2; exit 2; }
	$(PYTHON) -m spectra.analysis report $(SWEEPS) --out outputs/report

# Downstream evaluation (lm-evaluation-harness, the `eval` extra) of a saved model; the results go
# to the run directory (MODEL's parent when MODEL is a run's model/) as eval_harness.json.
# TASKS=bundled (default: local tasks from the corpus's held-out split) | paper | any lm-eval names;
# EVAL_ARGS passes more options, e.g. EVAL_ARGS="--device cuda --batch-size auto --allow-code-execution".
MODEL ?=
TASKS ?= bundled
LIMIT ?=
VIA ?= moe
EVAL_ARGS ?=
.PHONY: eval
eval: setup  ## lm-eval on a saved model -> <run dir>/eval_harness.json (MODEL=outputs/demo/spectra/model TASKS=bundled|paper LIMIT= VIA=moe|hf)
	@test -n "$(MODEL)" || { echo "usage: make eval MODEL=<run dir>/model [TASKS=bundled|paper|task,...] [LIMIT=n] [VIA=moe|hf]" >&2; exit 2; }
	$(PYTHON) -m spectra.eval $(MODEL) --tasks $(TASKS) --via $(VIA) $(if $(LIMIT),--limit $(LIMIT)) $(EVAL_ARGS)

test: setup  ## the whole suite (slow end-to-end tests included)
	$(PYTHON) -m pytest -q --durations=25

test-fast: setup  ## unit tests only, two processes (pytest-xdist)
	$(PYTHON) -m pytest -q -n 2 -m "not slow"

lint: setup  ## ruff
	$(PYTHON) -m ruff check src tests benchmarks train.py

# Benchmarks (benchmarks/): ratios measured in one process; `make bench` writes benchmarks/RESULTS.md.
# ARGS passes options through, e.g. make bench ARGS="--device cuda --dtype bfloat16" or ARGS=--quick.
ARGS ?=
.PHONY: bench bench-quick
bench: setup  ## speed/memory benchmarks (~12 min on 2 idle CPU cores) -> benchmarks/RESULTS.md (ARGS=--quick ...)
	$(PYTHON) -m benchmarks.run_all $(ARGS)
bench-quick: setup  ## the same at small sizes (~1 min) -> outputs/benchmarks/RESULTS.quick.md
	$(PYTHON) -m benchmarks.run_all --quick $(ARGS)

clean:  ## remove outputs and caches (keeps .venv and .venv-latest)
	rm -rf outputs multirun .pytest_cache .ruff_cache
