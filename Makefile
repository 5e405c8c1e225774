# Lepton: `make run` runs the demo pipeline end to end; `make test` runs the tests. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
DEMO_SAMPLES ?= 5000
PYTEST_ARGS ?=

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
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0  # the CPU wheel, first, so nothing else pulls a CUDA build
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

# keys Airflow's components must share; generated once per checkout, never committed
var/secrets.env:
	mkdir -p var
	umask 077; { echo "export AIRFLOW__API_AUTH__JWT_SECRET=$$(openssl rand -hex 32)"; \
	  echo "export AIRFLOW__API__SECRET_KEY=$$(openssl rand -hex 32)"; } > $@

run: setup
	source var/secrets.env && airflow db migrate > var/db-migrate.log 2>&1 && \
	  lepton run lepton_mnist1d --samples $(DEMO_SAMPLES)

# Debian's Chromium for the browser test (no browser download); skipped with a note where it cannot be installed
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get install -y -q chromium >/dev/null 2>&1; } || echo "chromium not installed: the browser test will skip"

test: setup browser
	source var/secrets.env && $(BIN)/ruff check . && $(BIN)/pytest $(PYTEST_ARGS)

# the local production profile: Airflow + MLflow on PostgreSQL (LEPTON_POSTGRES_URL), a Dask cluster; loopback only
up: setup
	lepton up

down:
	$(BIN)/lepton down

bench: setup
	source var/secrets.env && $(BIN)/python -m bench.run

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf var airflow.db logs simple_auth_manager_passwords.json.generated
