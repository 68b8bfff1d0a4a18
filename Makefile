# fleet-pipeline developer commands. `make demo` and `make test` are the two the
# README starts with; `make pr` runs every check CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON313 := $(shell .ci/python313)
VENV      := .venv
SAMVENV   := .venv-sam
BIN       := $(VENV)/bin
# sam build looks for python3.13 on PATH; the venv provides it.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export SAM_CLI_TELEMETRY := 0
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: help venv sam-venv lint typecheck validate build test demo pr bench-smoke clean

help:
	@echo "make demo       end-to-end demo on one host (throwaway PostgreSQL + local DynamoDB)"
	@echo "make test       the test suite against a throwaway PostgreSQL cluster"
	@echo "make pr         lint, typecheck, sam validate --lint, sam build, tests"
	@echo "make venv       create $(VENV) with python3.13 and the pinned dev dependencies"

$(BIN)/.installed: requirements-dev.txt layers/fleet/requirements.txt pyproject.toml
	@test -x $(BIN)/python3.13 || $(PYTHON313) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_QUIET) --upgrade pip
	$(BIN)/python -m pip install $(PIP_QUIET) -r requirements-dev.txt
	$(BIN)/python -m pip install $(PIP_QUIET) --no-deps -e .
	@touch $@

venv: $(BIN)/.installed

# aws-sam-cli pins its own dependency versions, so it lives in a venv of its own.
$(SAMVENV)/.installed: requirements-sam.txt
	@test -x $(SAMVENV)/bin/python || $(PYTHON313) -m venv $(SAMVENV)
	$(SAMVENV)/bin/python -m pip install $(PIP_QUIET) -r requirements-sam.txt
	@touch $@

sam-venv: $(SAMVENV)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy

validate: sam-venv
	$(SAMVENV)/bin/sam validate --lint

build: sam-venv venv
	$(SAMVENV)/bin/sam build

test: venv
	@.ci/ensure-postgres
	@.ci/ensure-faketime
	$(BIN)/pytest

demo: venv
	@.ci/ensure-postgres
	$(BIN)/fleet demo

pr: lint typecheck validate build test

bench-smoke: venv
	$(BIN)/python -m bench --smoke

clean:
	rm -rf .aws-sam .pytest_cache .mypy_cache .ruff_cache
