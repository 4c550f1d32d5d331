# Two commands on a fresh Debian/Ubuntu machine with Python 3.11+:
#   make run    set up .venv, make sure Fashion-MNIST can be had, run the whole DVC pipeline
#   make test   set up .venv, run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-cnnpipe
export PATH := $(abspath $(VENV))/bin:$(PATH)
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup lock dataset run test lint docs plots-template deploy worker sweep-worker

# The environment is uv.lock's, exactly: requirements/*.txt are its pins and hashes, exported by `make lock`
# (uv), and pip installs them with --require-hashes and no other dependency, then the project itself.
REQUIREMENTS := requirements/all.txt

$(STAMP): pyproject.toml $(REQUIREMENTS)
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "error: Python 3.11+ needed (set PYTHON=python3.11)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes --no-deps -r $(REQUIREMENTS)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	cp uv.lock $(VENV)/uv.lock  # the stages' provenance names it by hash (src/cnnpipe/core/provenance.py)
	touch $@

setup: $(STAMP)

# uv.lock after a change to pyproject.toml (pins kept where they still fit), or with UPGRADE=1 the newest
# releases pyproject.toml allows; then requirements/*.txt from it. Commit them with the `dvc repro` results
# the new environment makes (the stages record the lock's hash in metrics/*.info.json).
EXPORT := $(VENV)/bin/uv export -q --frozen --no-emit-project --no-header
lock: setup
	$(VENV)/bin/uv lock $(if $(UPGRADE),--upgrade)
	$(EXPORT) --extra pipeline --extra test -o requirements/all.txt
	$(EXPORT) -o requirements/serve.txt

dataset: setup
	PY=$(PY) scripts/ensure_dataset.sh

run: dataset
	dvc repro
	dvc metrics show

test: setup
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15

lint: setup
	$(PY) -m ruff check src tests pipeline scripts

# README.md's results table and docs/benchmarks.md, rewritten from metrics/*.json and bench/*.json
DOCS := README.md docs/benchmarks.md
docs: setup
	$(VENV)/bin/cog -r -I scripts -p "import docfigures as figures" $(DOCS)

# the offline HTML template of `dvc plots show` (vega, vega-lite, vega-embed inlined from the npm registry)
plots-template: setup
	$(PY) scripts/plots_template.py .dvc/offline-plots.html

# Prefect: a process work pool and the scheduled deployments of pipeline/prefect.yaml.
# Needs a Prefect API: `prefect server start` in another shell, then
# `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`.
POOL ?= cnnpipe-process
SWEEP_POOL ?= cnnpipe-sweeps
deploy: setup
	for pool in $(POOL) $(SWEEP_POOL); do \
	  prefect work-pool inspect $$pool >/dev/null 2>&1 || prefect work-pool create $$pool --type process; done
	env -u CNNPIPE_CLONE CNNPIPE_PROJECT=$(CURDIR) prefect --no-prompt deploy --all --prefect-file pipeline/prefect.yaml

worker: setup
	prefect worker start --pool $(POOL)

# On every host that takes sweep trials: a clone of the project (git remote `origin`, the DVC remote in its
# .dvc/config), then this. Trials run in this clone, one at a time, and are pushed to the remotes
# (pipeline/sweeps.py); more workers per host need more clones.
sweep-worker: setup
	CNNPIPE_CLONE=$(CURDIR) prefect worker start --pool $(SWEEP_POOL) --limit 1
