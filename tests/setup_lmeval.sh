#!/usr/bin/env bash
# Create (or confirm) the virtual environment that holds lm-evaluation-harness, the peer that
# tests/test_lm_eval.py runs the task configs of examples/lm_eval/ with. lm-eval is a test peer only,
# never a runtime dependency of slta, so it lives in its own venv: <repo>/.venv-lmeval (gitignored).
#
# Idempotent: does nothing when the venv already has the pinned versions.
# torch is installed first, pinned, so pip never resolves lm-eval's torch requirement to a CUDA build.
# The [hf] extra is needed: the bare lm-eval package has no transformers, so `--model hf` fails.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LMEVAL_VENV:-$ROOT/.venv-lmeval}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
LMEVAL_VERSION="${LMEVAL_VERSION:-0.4.13}"

installed() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$LMEVAL_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
torch_ok = version("torch").split("+")[0] == sys.argv[1]
version("transformers")  # the [hf] extra; metadata only, importing it would take seconds
sys.exit(0 if torch_ok and version("lm_eval") == sys.argv[2] else 1)
PY
}

if [ -x "$VENV/bin/lm_eval" ] && installed; then
    echo "lm-eval $LMEVAL_VERSION (torch $TORCH_VERSION) already in $VENV"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install --quiet "lm-eval[hf]==$LMEVAL_VERSION"
installed || { echo "setup_lmeval.sh: $VENV does not have torch $TORCH_VERSION + lm-eval[hf] $LMEVAL_VERSION" >&2; exit 1; }
echo "lm-eval $LMEVAL_VERSION (torch $TORCH_VERSION) installed in $VENV"
