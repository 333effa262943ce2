# streamkeeper: two commands do all the set-up on a fresh Debian machine.
#   make test   installs what is missing, then runs the whole test suite
#   make demo   installs what is missing, then runs the whole stack on loopback
#   make bench  runs the benchmarks and writes bench/RESULTS.md

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test demo bench bench-cold-start deps venv clean

deps:
	@sh scripts/install-deps.sh

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e '.[test,bench]'
	@touch $(STAMP)

venv: deps $(STAMP)

test: venv
	$(VPY) -m pytest

bench: venv
	$(VPY) bench/heartbeat.py
	$(VPY) bench/cold_start.py
	$(VPY) bench/reaper.py

demo: venv
	$(VPY) -m demo.run

bench-cold-start: venv
	$(VPY) bench/cold_start.py

clean:
	rm -rf $(VENV) .pytest_cache
