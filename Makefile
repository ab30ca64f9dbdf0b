# genloop: `make run` installs and runs the whole loop; `make test` installs and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch: from the local wheel folder where the machine has one, else
# from PyTorch's CPU index (the lock pins torch==2.13.0+cpu).
TORCH_SOURCE := $(if $(wildcard /opt/wheels/torch-2.13.0*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install run test test-integration lint lock clean-workspace services services-down services-status deploy

$(BIN)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.9
	$(BIN)/uv pip install --quiet --python $(BIN)/python $(TORCH_SOURCE) -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

install: $(BIN)/.installed  ## create .venv and install the pinned lock + genloop

run: install  ## collect the built-in corpus and run the whole loop (Prefect flow, MLflow, DVC)
	$(BIN)/genloop loop

test: install  ## run the test suite (real MLflow/Prefect/moto servers on 127.0.0.1)
	@# the review page's browser test drives Debian's chromium (Playwright cannot download browsers offline)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium unavailable: the browser test will be skipped"
	$(BIN)/python -m pytest -q -n 2 --dist loadfile  # two workers, one test file each: the servers mostly wait

test-integration: install  ## only the tests against real servers (services, deployments, S3, failures)
	$(BIN)/python -m pytest -q -m integration

services: install  ## start MLflow server, Prefect server and a process worker on 127.0.0.1 (logs: .genloop/services/logs)
	$(BIN)/genloop services up

services-down:  ## stop exactly the processes `make services` started
	$(BIN)/genloop services down

services-status:
	$(BIN)/genloop services status

deploy: install  ## register the local deployments (nightly, hourly) with the running Prefect server
	source .genloop/services/env.sh && $(BIN)/prefect --no-prompt deploy --name nightly --name hourly --prefect-file flows/prefect.yaml

lint: install
	$(BIN)/ruff check src tests flows

lock:  ## re-resolve requirements.lock after changing pyproject.toml
	uv pip compile pyproject.toml --extra test --python-version 3.11 \
	  --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels \
	  --override requirements-torch-override.txt --no-emit-find-links -o requirements.lock

clean-workspace:  ## remove everything the loop wrote (data, models, runs, outputs)
	rm -rf data/raw data/clean data/manifest.parquet models outputs reports mlflow.db mlartifacts .genloop/cache gx/uncommitted data.dvc
