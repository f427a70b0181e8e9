#!/usr/bin/env bash
# The main job on its embedded default: sets up the environment if needed (the runtime set only: no test
# tools, no torch; this project installed editable, so no PYTHONPATH), generates the synthetic shapes dataset
# (once, in TFDS's data dir), trains configs/demo.py on this machine's devices, evaluates, and prints
# the COCO table. Extra arguments go to atss_jax.main (e.g. --config.train.num_steps=200).
# WORKDIR picks the output directory (default: a new one under /tmp); rerunning in it resumes.
# VENV picks the environment (default: .venv); `bash scripts/setup.sh cuda12` (or tpu) first for an accelerator.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
venv="${VENV:-.venv}"
workdir="${WORKDIR:-/tmp/atss_demo_$(date +%Y%m%d_%H%M%S)}"
echo "Workdir: $workdir (metrics.json, TensorBoard events, checkpoints, eval/ PNGs)"
"$venv/bin/python" -m atss_jax.main --config=configs/demo.py --workdir="$workdir" "$@"
