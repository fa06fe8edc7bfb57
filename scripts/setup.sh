#!/usr/bin/env bash
# Create (or update) the project's virtual environment at .venv with the pinned versions of
# requirements-lock.txt, and install ran-bench into it in editable mode. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# pip >= 23.1 is needed for constraints to apply in build isolation; quiet unless it fails.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-lock.txt
# setuptools prints pages of deprecation notes while building the editable wheel; show them only on failure.
if ! log=$(.venv/bin/python -m pip install -q --no-deps -e . 2>&1); then
  echo "$log" >&2
  exit 1
fi
.venv/bin/ran-bench --version
