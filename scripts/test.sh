#!/usr/bin/env bash
# Sets up the environment with the test set if needed (scripts/setup.sh --test: the pinned CPU packages plus
# pytest, hypothesis, ruff and torch, and this project installed editable, so no PYTHONPATH), then runs the
# linter and the test suite. Extra arguments go to pytest. VENV picks the environment (default: .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
venv="${VENV:-.venv}"
"$venv/bin/ruff" check --config .ci/ruff.toml .
# pytest exits non-zero when no test ran (exit 5), so an empty run fails CI too; the 15 slowest tests are
# listed so that the suite's time stays visible.
"$venv/bin/python" -m pytest -q --durations=15 "$@" tests
