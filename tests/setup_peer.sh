#!/usr/bin/env bash
# Create (or confirm) the virtual environment of one test peer:
#   mergekit  the reference the parity tests (tests/test_mergekit_parity.py) and bench_speed.py compare against
#   lmeval    lm-evaluation-harness, which tests/test_lm_eval.py runs the task configs of examples/lm_eval/ with
# A peer is never a runtime dependency of slta, so each lives in its own venv, <repo>/.venv-<peer> (gitignored).
#
# Usage: bash tests/setup_peer.sh mergekit|lmeval
# Idempotent: does nothing when the venv already has the pinned versions.
# torch is installed first, pinned, so pip never resolves the peer's torch requirement to a CUDA
# build (on a machine without a local CPU wheel, point pip at a CPU-only torch index).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
case "${1:-}" in
    mergekit)
        VENV="${MERGEKIT_VENV:-$ROOT/.venv-mergekit}"; DIST=mergekit; VERSION="${MERGEKIT_VERSION:-0.1.5}"
        SPEC="mergekit==$VERSION"; BIN=mergekit-yaml; ALSO="" ;;
    lmeval)
        # the [hf] extra is needed: the bare lm-eval package has no transformers, so `--model hf` fails
        VENV="${LMEVAL_VENV:-$ROOT/.venv-lmeval}"; DIST=lm_eval; VERSION="${LMEVAL_VERSION:-0.4.13}"
        SPEC="lm-eval[hf]==$VERSION"; BIN=lm_eval; ALSO=transformers ;;
    *)
        echo "usage: bash tests/setup_peer.sh mergekit|lmeval" >&2; exit 2 ;;
esac

installed() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$DIST" "$VERSION" "$ALSO" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
torch_ok = version("torch").split("+")[0] == sys.argv[1]
if sys.argv[4]:
    version(sys.argv[4])  # metadata only: importing it would take seconds
sys.exit(0 if torch_ok and version(sys.argv[2]) == sys.argv[3] else 1)
PY
}

if [ -x "$VENV/bin/$BIN" ] && installed; then
    echo "$SPEC (torch $TORCH_VERSION) already in $VENV"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
"$VENV/bin/python" -m pip install --quiet "$SPEC"
installed || { echo "setup_peer.sh: $VENV does not have torch $TORCH_VERSION + $SPEC" >&2; exit 1; }
echo "$SPEC (torch $TORCH_VERSION) installed in $VENV"
