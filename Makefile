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

.PHONY: setup dataset run test lint docs plots-template deploy worker

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "error: Python 3.11+ needed (set PYTHON=python3.11)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[pipeline,test]'
	touch $@

setup: $(STAMP)

dataset: setup
	PY=$(PY) scripts/ensure_dataset.sh

run: dataset
	dvc repro
	dvc metrics show

test: setup
	$(PY) -m pytest -n 2 --dist loadfile

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
deploy: setup
	prefect work-pool inspect $(POOL) >/dev/null 2>&1 || prefect work-pool create $(POOL) --type process
	CNNPIPE_PROJECT=$(CURDIR) prefect --no-prompt deploy --all --prefect-file pipeline/prefect.yaml

worker: setup
	prefect worker start --pool $(POOL)
