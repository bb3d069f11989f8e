#!/usr/bin/env bash
# Create (or confirm) the virtual environment that holds mergekit, the reference the parity tests
# (tests/test_mergekit_parity.py) compare slta against. mergekit is a test peer only, never a
# runtime dependency of slta, so it lives in its own venv: <repo>/.venv-mergekit (gitignored).
#
# Idempotent: does nothing when the venv already has the pinned versions.
# torch is installed first, pinned, so pip never resolves mergekit's torch requirement to a CUDA
# build (on a machine without a local CPU wheel, point pip at a CPU-only torch index).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MERGEKIT_VENV:-$ROOT/.venv-mergekit}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
MERGEKIT_VERSION="${MERGEKIT_VERSION:-0.1.5}"

installed() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$MERGEKIT_VERSION" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
torch_ok = version("torch").split("+")[0] == sys.argv[1]
sys.exit(0 if torch_ok and version("mergekit") == sys.argv[2] else 1)
PY
}

if [ -x "$VENV/bin/mergekit-yaml" ] && installed; then
    echo "mergekit $MERGEKIT_VERSION (torch $TORCH_VERSION) already in $VENV"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install --quiet "mergekit==$MERGEKIT_VERSION"
installed || { echo "setup_mergekit.sh: $VENV does not have torch $TORCH_VERSION + mergekit $MERGEKIT_VERSION" >&2; exit 1; }
echo "mergekit $MERGEKIT_VERSION (torch $TORCH_VERSION) installed in $VENV"
