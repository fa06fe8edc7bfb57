#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite. Extra arguments go to pytest.
# Tests marked `slurm` need a reachable cluster (SLURM_CONF pointing at a running one, as .ci/run
# starts with slurm/ci/start-slurm.sh); without one they are skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
