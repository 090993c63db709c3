#!/usr/bin/env bash
# Set up Winnow in ./.venv. Idempotent: a second run only checks what is there.
#   scripts/setup.sh          runtime install
#   scripts/setup.sh --dev    runtime + test/lint tools, the dask extra, and chromium for the
#                             browser tests (Debian's package, with apt, when it is missing)
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
if [[ -n "$EXTRAS" ]] && ! command -v chromium >/dev/null 2>&1; then
  # the report and Prefect-UI tests drive a real headless chromium through playwright; where apt
  # is not there (or not root) they skip and say why
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == "0" ]]; then
    (DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; }) \
      || echo "setup.sh: chromium could not be installed; the browser tests will skip" >&2
  else
    echo "setup.sh: no chromium and no apt-get as root; the browser tests will skip" >&2
  fi
fi
