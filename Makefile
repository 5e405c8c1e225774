# Lepton: `make run` runs the demo pipeline end to end; `make test` runs the tests. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
DEMO_SAMPLES ?= 5000
# three test files at a time on the 2 cores, in tests/conftest.py's order: the slowest first (xdist's default reorders
# files by their number of tests, which left the long one-test integration files for last). The integration files
# spend much of their time waiting on Airflow's and Dask's loops, and a third file fills those waits (two at a time
# left a fifth of the 2 cores idle). -rs: every skip's reason in the summary (only what is not configured skips)
PYTEST_ARGS ?= -n 3 --dist loadfile --no-loadscope-reorder --durations=30 -rs
TORCH_VERSION := 2.13.0
UV_VERSION := 0.13.9
UV_INSTALL = UV_NATIVE_TLS=1 $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python
# pip's wheel folders (the CPU torch wheel is on disk here), for uv, which reads no pip configuration
WHEEL_FOLDERS = $(foreach folder,$(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)),--find-links $(folder))
# cuda where an NVIDIA driver is present, else cpu; `make setup TORCH_BUILD=cpu` forces the CPU wheel
TORCH_BUILD ?= $(shell { test -e /proc/driver/nvidia/version || nvidia-smi -L; } >/dev/null 2>&1 && echo cuda || echo cpu)

# this repository is the AIRFLOW_HOME; outputs, the SQLite stores and secrets live in var/ (git-ignored)
export AIRFLOW_HOME := $(CURDIR)
export LEPTON_DATA_ROOT ?= $(CURDIR)/var/data
export PATH := $(BIN):$(PATH)
export GX_ANALYTICS_ENABLED := false
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export MLFLOW_ALLOW_PICKLE_DESERIALIZATION := false

.PHONY: setup run test bench lint clean up down browser

setup: $(VENV)/.installed var/secrets.env

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# uv installs in seconds what took pip over a minute of each clean checkout's `make test`; compiled to bytecode
	# as pip does, since a process that may not write .pyc files (PYTHONDONTWRITEBYTECODE, set on this machine)
	# would otherwise compile every module it imports, at every start
	$(BIN)/pip install -q uv==$(UV_VERSION)
ifeq ($(TORCH_BUILD),cuda)
	# PyPI's Linux build of the same version is the CUDA one; no local wheel folder or cap may stand in for it
	env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null $(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -c 'import sys, torch; sys.exit(None if torch.version.cuda else "an NVIDIA driver is present but pip installed torch " + torch.__version__ + " without CUDA")'
else
	$(UV_INSTALL) torch==$(TORCH_VERSION) $(WHEEL_FOLDERS)  # the CPU wheel, first, so nothing pulls a CUDA build
endif
	$(UV_INSTALL) -r requirements.txt
	$(UV_INSTALL) --no-deps -e .
	touch $@

# keys Airflow's components must share; generated once per checkout (mode 600), never committed
var/secrets.env: $(VENV)/.installed
	$(BIN)/python -m lepton_tasks.tools.airflow_home

# `lepton run` migrates the Airflow DB, loads var/secrets.env and finds Airflow beside itself (works from cron too)
run: setup
	$(BIN)/lepton run lepton_mnist1d --samples $(DEMO_SAMPLES)

# Debian's Chromium for the browser test (no browser download); where it cannot be installed the test skips, saying
# why in the summary, except in CI, where it fails
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get install -y -q chromium >/dev/null 2>&1; } || echo "chromium not installed: the browser test will skip (and fail where CI is set)"

test: setup browser
	source var/secrets.env && $(BIN)/ruff check . && $(BIN)/pytest $(PYTEST_ARGS)

# the local production deployment: Airflow + MLflow on PostgreSQL (LEPTON_POSTGRES_URL), a Dask cluster; loopback only
up: setup
	lepton up

down:
	$(BIN)/lepton down

# Flower for the flower_side_by_side benchmark, in its own environment: flwr[simulation] pins FastAPI, Starlette
# and protobuf versions that Airflow's api-server cannot share
FLOWER_VENV := $(CURDIR)/.venv-flower

$(FLOWER_VENV)/.installed: bench/flower-requirements.txt
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/pip install -q uv==$(UV_VERSION)
	$(UV_INSTALL:$(BIN)/%=$(FLOWER_VENV)/bin/%) torch==$(TORCH_VERSION) $(WHEEL_FOLDERS)
	$(UV_INSTALL:$(BIN)/%=$(FLOWER_VENV)/bin/%) -r bench/flower-requirements.txt
	touch $@

bench: setup $(FLOWER_VENV)/.installed
	source var/secrets.env && $(BIN)/python -m bench.run

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf var airflow.db logs simple_auth_manager_passwords.json.generated .venv-flower
