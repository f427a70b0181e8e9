#!/usr/bin/env bash
# Sets up .venv if needed, then runs the linter and the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/ruff check --config .ci/ruff.toml .
# pytest exits non-zero when no test ran (exit 5), so an empty run fails CI too; the 15 slowest tests are
# listed so that the suite's time stays visible.
.venv/bin/python -m pytest -q --durations=15 "$@" tests
