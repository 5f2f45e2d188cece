# coupon-stream: make demo | make test | make bench | make up | make down
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := .local/demo

.PHONY: install up down demo test unit integration bench lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up:
	bash scripts/services.sh up

down:
	bash scripts/services.sh down

lint: install
	$(BIN)/ruff check coupon_stream tests bench

unit: install
	$(BIN)/pytest -q tests/unit

integration: install up
	$(BIN)/pytest -q tests/integration

test: install up
	$(BIN)/pytest -q -ra tests

bench: install up
	$(BIN)/python -m bench.run $(BENCH_ARGS)

demo: install
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) .local/demo
