# coupon-stream: make demo | make test | make bench | make bench-peers | make up | make secure-up | make toxiproxy | make down | make image
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR := .local/demo

.PHONY: install up secure-up toxiproxy down demo test unit integration bench bench-peers lint clean containers image

ifeq ($(CI),true)
# CI on the project's machines: HTTPS goes through a proxy that re-signs TLS, so the image
# build (pip) is told to trust the host's extra CA certificates. An explicit option
# (README, "Deploy with containers"); nothing does this outside CI unless asked.
COUPON_EXTRA_CA_DIR ?= $(if $(wildcard /usr/local/share/ca-certificates/*.crt),/usr/local/share/ca-certificates)
export COUPON_EXTRA_CA_DIR
endif

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up:
	bash scripts/services.sh up

# A secured Kafka (SASL_SSL on 19092, mutual TLS on 19093) and a TLS-only MariaDB (3307)
# for the integration tests, next to the plain ones of `make up` (scripts/secure.sh;
# `bash scripts/secure.sh env` prints their addresses, certificates and test users).
secure-up:
	bash scripts/secure.sh start

# Toxiproxy (API 127.0.0.1:8474) with the proxy "kafka": 127.0.0.1:9095 -> the broker's
# PROXIED listener 127.0.0.1:9094, for the network-fault tests (scripts/toxiproxy.sh; the
# first start builds it with Go into .local/bin). Under CI=true a failure stops the run;
# elsewhere the tests that need it then skip, saying why.
toxiproxy:
ifeq ($(CI),true)
	bash scripts/toxiproxy.sh start
else
	@bash scripts/toxiproxy.sh start || echo "[make] no toxiproxy: the tests through it will skip"
endif

down:
	bash scripts/toxiproxy.sh stop || true
	bash scripts/secure.sh stop || true
	bash scripts/services.sh down

lint: install
	$(BIN)/ruff check coupon_stream tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -q tests/unit

integration: install up secure-up containers toxiproxy
	$(BIN)/pytest -q tests/integration

# The container test (tests/integration/test_containers.py) builds the images itself
# (scripts/image.sh, cached); this installs podman, Prometheus and podman-compose. Under
# CI=true a failure stops the run; elsewhere the container test then skips, saying why.
containers: install
ifeq ($(CI),true)
	bash scripts/podman.sh install
else
	@bash scripts/podman.sh install || echo "[make] no container runtime: the container test will skip"
endif

# The worker image and, where no registry answers, its base and the compose stack's images
# as local stand-ins (scripts/image.sh). COUPON_EXTRA_CA_DIR=<dir of *.crt>: CA certificates
# of a TLS-inspecting proxy for the build's pip (a build secret, not kept in the image).
image: install
	bash scripts/podman.sh install
	bash scripts/image.sh all

test: install up secure-up containers toxiproxy
	$(BIN)/pytest -q -ra tests

bench: install up
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# Issue 28's peer: the seed job in Pathway next to one worker, on `make bench`'s input
# (bench/peers/run.py; PEERS_ARGS='--orders N --runs R --threads T --check'). Pathway
# comes from the `peers` extra, into this venv, for this target only.
PEERS_STAMP := $(VENV)/.peers-installed
$(PEERS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e '.[dev,peers]'
	touch $(PEERS_STAMP)

bench-peers: install up $(PEERS_STAMP)
	$(BIN)/pytest -q -p no:cacheprovider bench/peers
	$(BIN)/python -m bench.peers.run $(PEERS_ARGS)

demo: install
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) .local/demo
