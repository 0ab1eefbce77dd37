# Thin targets: each is one rclib or pytest call. `make book` and `make test` create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= cpu
# torch's OpenMP threads spin while waiting; with another busy process that starves training
# (measured 20x slower on these 2-core machines). PASSIVE makes them sleep instead.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install book test test-all lab bench gpu-check clean

install: $(VENV)/.installed

# torch/torchvision pinned to the releases kept on the project machines (a newer one downloads GBs)
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e '.[dev]'
	# rfc3987-syntax (an optional format checker of jsonschema, pulled in through jupyter-events)
	# compiles 38 grammars when nbformat is imported: 1.2 s of CPU in every chapter's kernel and
	# in every tool. Nothing here validates IRIs; without it jsonschema skips that one check.
	$(PY) -m pip uninstall -y rfc3987-syntax
	touch $@

book: install
	$(PY) -m rclib book --profile $(PROFILE)

# everything but the paper-profile book and the torchrun runs (markers `paper`, `torchrun`,
# pyproject.toml); test-all runs them too (CI)
test: install
	$(PY) -m pytest

test-all: install
	$(PY) -m pytest -m ""

lab: install
	$(PY) -m rclib lab

# one bounded measurement of the paper setting on this device (README, "Measuring on a GPU")
gpu-check: install
	$(PY) -m rclib gpu-check

bench: install
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf _build data/artifacts
