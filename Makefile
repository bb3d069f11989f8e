# The two newcomer commands (README): `make demo` and `make test`. Each sets up what it needs.
PY ?= python3

.PHONY: setup test demo

setup:
	$(PY) -m pip install -q torch==2.13.0   # CPU build first, so nothing pulls a CUDA torch
	$(PY) -m pip install -q -e ".[test]"

test: setup
	bash tests/setup_mergekit.sh            # mergekit 0.1.5 in .venv-mergekit: the parity tests' peer
	$(PY) -m pytest

demo: setup
	$(PY) -m slta.cli demo
