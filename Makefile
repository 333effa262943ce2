# streamkeeper: two commands do all the set-up on a fresh Debian machine.
#   make test   installs what is missing, then the linters and the whole test suite
#   make test-fast  the unit tier only (seconds)
#   make demo   installs what is missing, then runs the whole stack on loopback
#   make bench  runs the benchmarks and writes bench/RESULTS.md

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The web player the tests run (hls.js, driven in Debian's Chromium by playwright-core).
PLAYERS       := tests/players
PLAYERS_STAMP := $(PLAYERS)/node_modules/.installed

.PHONY: test test-fast lint demo bench bench-cold-start deps venv players clean

deps:
	@sh scripts/install-deps.sh

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test,bench]'
	@touch $(STAMP)

venv: deps $(STAMP)

$(PLAYERS_STAMP): $(PLAYERS)/package.json $(PLAYERS)/package-lock.json
	cd $(PLAYERS) && npm ci --no-audit --no-fund --loglevel=error
	@touch $(PLAYERS_STAMP)

players: deps $(PLAYERS_STAMP)

test: venv players lint
	$(VPY) -m pytest

# The unit tier only: pure logic, no process started (seconds).
test-fast: venv
	$(VPY) -m pytest -m unit

# ruff (lint and format) and mypy, pinned in setup.cfg's test extra.
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# Strings split by hand and joined by the formatter onto one line ("a " "b"): one string.
	# Its own run: in the config, ruff format warns that the rule may conflict with it.
	$(VENV)/bin/ruff check --select ISC001 .
	$(VENV)/bin/mypy

bench: venv players
	$(VPY) -m bench.heartbeat
	$(VPY) -m bench.cold_start
	$(VPY) -m bench.reaper
	$(VPY) -m bench.capacity
	$(VPY) -m bench.relay
	$(VPY) -m bench.continuity
	$(VPY) -m bench.scale

demo: venv
	$(VPY) -m demo.run

bench-cold-start: venv players
	$(VPY) -m bench.cold_start

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info $(PLAYERS)/node_modules test-artifacts
