#!/usr/bin/env bash
# Creates .venv with the pinned packages; re-installs only when a requirements file changes.
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(cat requirements.txt requirements-test.txt | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.requirements.sha 2>/dev/null)" != "$want" ]; then
  echo "setup: installing the pinned packages into .venv (first run: a few minutes)" >&2
  python3 -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r requirements-test.txt
  echo "$want" > .venv/.requirements.sha
fi
