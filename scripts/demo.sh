#!/usr/bin/env bash
# Sets up .venv if needed, then runs the main job on its embedded default. Until the trainer lands
# that job is the assignment benchmark at the COCO canvas (batch 16, 800x1344, 100 boxes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
.venv/bin/python -m scripts.benchmark_assign "$@"
