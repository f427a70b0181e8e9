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
# listed so that the suite's time stays visible. The tests run on TEST_WORKERS pytest-xdist workers (default:
# one per core and one more, at most 4: a worker often waits on a subprocess or a file, and another fills the
# core), grouped by the set-ups they share (tests/conftest.py); TEST_WORKERS=0 runs them in this process.
# `-m "not e2e"` runs the fast tier alone (README "Tests").
workers="${TEST_WORKERS:-$("$venv/bin/python" -c 'import os
print(min(4, 1 + (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)))')}"
parallel=()
[ "$workers" = 0 ] || parallel=(-n "$workers" --dist loadgroup --no-loadscope-reorder)
"$venv/bin/python" -m pytest -q --durations=15 ${parallel[@]+"${parallel[@]}"} "$@" tests
