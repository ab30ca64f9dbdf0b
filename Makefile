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
# Debian's fonts-noto-color-emoji: the colour test corpus (bench/build_emoji_corpus.py)
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf

.PHONY: install install-dev run test test-integration lint lock clean-workspace services services-down services-status deploy

# genloop runs on Python >= 3.11 (pyproject's requires-python): say so before building a venv that cannot work
PYTHON_OK = $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	|| { echo "genloop needs Python >= 3.11; $(PYTHON) is $$($(PYTHON) --version 2>&1). Run: make PYTHON=python3.11 ..." >&2; exit 1; }
# --compile-bytecode: bytecode for every installed module, once at install (about a minute on 2
# cores). Where PYTHONDONTWRITEBYTECODE is set, as on these machines, Python never caches it, and
# every genloop process recompiled torch & co. on import (import torch: 4.6 s -> 2.4 s).
UV_INSTALL = $(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python $(TORCH_SOURCE)

$(BIN)/uv:
	@$(PYTHON_OK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==0.13.9

# the runtime lock (no test tools; what the Docker image installs too), with hashes
$(BIN)/.installed: pyproject.toml requirements.lock | $(BIN)/uv
	$(UV_INSTALL) -r requirements.lock
	$(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps -e .
	touch $@

# the runtime lock plus the test tools (pytest, moto, ruff, playwright), with hashes
$(BIN)/.installed-dev: $(BIN)/.installed requirements-dev.lock
	$(UV_INSTALL) -r requirements-dev.lock
	touch $@

install: $(BIN)/.installed  ## create .venv and install the pinned runtime lock + genloop

install-dev: $(BIN)/.installed-dev  ## install + the pinned test tools

run: install  ## collect the built-in corpus and run the whole loop (Prefect flow, MLflow, DVC)
	$(BIN)/genloop loop

test: install-dev  ## run the test suite (real MLflow/Prefect/moto servers on 127.0.0.1)
	@# Debian packages the tests use: the review page's browser test drives chromium (Playwright cannot
	@# download browsers offline); the colour-corpus tests render Noto Color Emoji (tests/colour_corpus.py);
	@# the production-stack test runs PostgreSQL (tests/integration/test_production_stack.py)
	@missing=$$(echo $$(command -v chromium >/dev/null 2>&1 || echo chromium) \
	  $$([ -f $(EMOJI_FONT) ] || echo fonts-noto-color-emoji) \
	  $$(ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || echo postgresql)); \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; } \
	  || echo "$$missing unavailable: the tests that need it will be skipped"
	$(BIN)/python -m pytest -q -n 2 --dist loadfile  # two workers, one test file each: the servers mostly wait

test-integration: install-dev  ## only the tests against real servers (services, deployments, S3, failures)
	$(BIN)/python -m pytest -q -m integration

services: install  ## start MLflow server, Prefect server and a process worker on 127.0.0.1 (logs: .genloop/services/logs)
	$(BIN)/genloop services up

services-down:  ## stop exactly the processes `make services` started
	$(BIN)/genloop services down

services-status:
	$(BIN)/genloop services status

deploy: install  ## register the local deployments (nightly, hourly) with the running Prefect server
	source .genloop/services/env.sh && $(BIN)/prefect --no-prompt deploy --all --prefect-file flows/prefect.yaml

lint: install-dev
	$(BIN)/ruff check src tests flows

LOCK_FLAGS = --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels \
	--override requirements-torch-override.txt --no-emit-find-links --generate-hashes
lock:  ## re-resolve requirements.lock (runtime) and requirements-dev.lock (+ test tools) after changing pyproject.toml
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra test --extra pretrained $(LOCK_FLAGS) -o requirements-dev.lock

clean-workspace:  ## remove everything the loop wrote (data, models, runs, outputs)
	rm -rf data/raw data/clean data/manifest.parquet models outputs reports mlflow.db mlartifacts .genloop/cache gx/uncommitted
	git checkout -- data.dvc  # the committed version of the built-in corpus
