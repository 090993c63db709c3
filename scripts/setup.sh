#!/usr/bin/env bash
# Set up Winnow in ./.venv. Idempotent: a second run only checks what is there.
#   scripts/setup.sh          runtime install
#   scripts/setup.sh --dev    runtime + test/lint tools and the dask extra
# TORCH_SPEC overrides the torch requirement (default torch==2.13.0: the local CPU
# wheel on this project's machines, the CUDA build from PyPI on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
EXTRAS=""
[[ "${1:-}" == "--dev" ]] && EXTRAS="[dev]"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
# torch first and pinned, so that no later requirement pulls another build.
"${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
"${PIP[@]}" install -e ".${EXTRAS}"
