# The two newcomer commands (README): `make demo` and `make test`. Each sets up what it needs.
#
# They install into the active virtual environment (VIRTUAL_ENV) if there is one, else into the
# project's own .venv: Debian/Ubuntu's system Python refuses global pip installs (PEP 668,
# "externally-managed-environment"). `make test VENV=path` picks another one.
SYSTEM_PY ?= python3
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Set up once per venv and checkout, again when pyproject.toml changes: a venv may be shared by
# several checkouts, each needing its own editable install.
STAMP := $(VENV)/.slta-setup-$(shell printf '%s' "$(CURDIR)" | cksum | cut -d' ' -f1)

.PHONY: setup test demo

setup: $(STAMP)

$(STAMP): pyproject.toml
	@[ -x "$(PY)" ] || $(SYSTEM_PY) -m venv "$(VENV)" || { echo "make: cannot create $(VENV) with" \
	  "'$(SYSTEM_PY) -m venv' (on Debian/Ubuntu: apt install python3-venv)" >&2; exit 1; }
	"$(PY)" -m pip install -q "torch==$(TORCH_VERSION)"   # CPU build first, so nothing pulls a CUDA torch
	"$(PY)" -m pip install -q -e ".[test]"
	@touch "$@"

test: setup
	PYTHON=$(SYSTEM_PY) bash tests/setup_peer.sh mergekit   # mergekit 0.1.5 in .venv-mergekit: the parity tests' peer
	PYTHON=$(SYSTEM_PY) bash tests/setup_peer.sh lmeval     # lm-eval in .venv-lmeval: runs examples/lm_eval/
	"$(PY)" -m pytest

demo: setup
	"$(PY)" -m slta.cli demo
