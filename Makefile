# Every target does its own set-up: a fresh machine needs only python3 and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The benchmarks' extra packages (aiohttp, the peer of bench/bench_peers.py).
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: demo test test-slow bench bench-all docs lint clean services

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Debian's redis-server and wrk, installed when missing (tests start their own
# private redis-server processes on free ports; nothing uses the system one).
services:
	@if ! command -v redis-server >/dev/null 2>&1 || ! command -v wrk >/dev/null 2>&1; then \
	    echo "installing redis-server and wrk from Debian's packages"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server wrk) >/dev/null \
	      || { echo "could not install redis-server/wrk with apt-get" >&2; exit 1; }; \
	fi

demo: $(STAMP)
	$(PY) -m lbnode.demo

test: $(STAMP) services
	$(PY) -m pytest -q

test-slow: $(STAMP) services
	$(PY) -m pytest -q -m slow

# lbnode next to HAProxy, nginx and aiohttp (each skipped when absent), standalone
# and in a three-node cluster; writes the table into docs/performance.md.
bench: $(BENCH_STAMP) services
	$(PY) bench/bench_peers.py --write-docs

# Every benchmark: the hop, rule matching, the Redis client, config convergence,
# idle-connection memory, and the peers side by side (without writing the docs).
bench-all: $(BENCH_STAMP) services
	$(PY) bench/run.py
	$(PY) bench/bench_rules.py
	$(PY) bench/bench_redis.py
	$(PY) bench/bench_cluster.py
	$(PY) bench/bench_idle.py
	$(PY) bench/bench_streams.py
	$(PY) bench/bench_peers.py

docs: $(STAMP)
	$(PY) -m lbshared.docgen > docs/configuration.md

clean:
	rm -rf $(VENV) build *.egg-info
