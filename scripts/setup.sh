#!/usr/bin/env bash
# Creates the virtual environment with the pinned packages of one accelerator, then installs this project
# into it (`pip install --no-deps -e .`, so atss_jax, configs and scripts import from any folder).
#
#   bash scripts/setup.sh [cpu|cuda12|tpu] [--test]
#
#   cpu     requirements.txt (the default for a new environment)
#   cuda12  requirements-cuda12.txt: NVIDIA GPUs, CUDA 12 (Linux)
#   tpu     requirements-tpu.txt: Cloud TPU VMs (Linux)
#   --test  adds requirements-test.txt (pytest, hypothesis, ruff, torch): what scripts/test.sh needs
#
# Without an accelerator it keeps the one the environment was set up for (cpu for a new one), so that
# scripts/test.sh and scripts/demo.sh do not undo `setup.sh cuda12`. It re-installs only when a requirements
# file or pyproject.toml changed or more is asked for (a stamp in the environment); the test set, once in,
# stays. Naming another accelerator re-creates the environment (no stale CUDA/TPU plugin left behind).
# VENV picks the environment (default: .venv in the repository); PYTHON the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { echo "usage: bash scripts/setup.sh [cpu|cuda12|tpu] [--test]" >&2; exit 2; }
accel="" test=0
for arg in "$@"; do
  case "$arg" in
    cpu|cuda12|tpu) [ -z "$accel" ] || usage; accel="$arg" ;;
    --test) test=1 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown argument '$arg'" >&2; usage ;;
  esac
done

# The Python version first: jax/jaxlib 0.10 publish wheels for Python >= 3.11 only, TensorFlow 2.21 up to 3.13.
python="${PYTHON:-python3}"
supported() {  # prints the version; fails unless it is 3.11-3.13
  "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3]); sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))'
}
if ! command -v "$python" >/dev/null 2>&1; then
  found="no '$python' on PATH"
elif found=$(supported "$python" 2>/dev/null); then
  found=""
else
  found="'$python' is Python ${found:-of an unknown version} ($(command -v "$python"))"
fi
if [ -n "$found" ]; then
  cat >&2 <<EOF
setup: atss-jax needs Python 3.11, 3.12 or 3.13 (jax/jaxlib 0.10 need >= 3.11; TensorFlow 2.21 has wheels up
to 3.13), but $found.
Install one (Debian/Ubuntu: apt install python3.11 python3.11-venv; macOS: brew install python@3.11; or
pyenv install 3.11 / uv python install 3.11) and rerun with it: PYTHON=python3.11 bash scripts/setup.sh
EOF
  exit 1
fi
if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
  echo "setup: $python has no venv/ensurepip module (Debian/Ubuntu: apt install python3.11-venv, for its version)." >&2
  exit 1
fi

venv="${VENV:-.venv}"
stamp="$venv/.atss-setup"
# What the environment holds: "accel test sha" (absent: none, or set up before this stamp existed).
read -r have_accel have_test have_sha 2>/dev/null < "$stamp" || have_accel="" have_test=0 have_sha=""
accel="${accel:-${have_accel:-cpu}}"
if [ "$accel" != cpu ] && [ "$(uname -s)" != Linux ]; then
  echo "setup: the $accel wheels (jax's plugin, NVIDIA's libraries, libtpu) exist for Linux only" >&2
  exit 1
fi
[ "$have_test" = 1 ] && test=1  # the test set, once in, stays (and follows new pins)
files=(requirements.txt pyproject.toml)
[ "$accel" = cpu ] || files+=("requirements-$accel.txt")
[ "$test" = 0 ] || files+=(requirements-test.txt)
want_sha=$(cat "${files[@]}" | "$python" -c 'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')

if [ -n "$have_accel" ] && [ "$have_accel" != "$accel" ]; then
  echo "setup: $venv was set up for $have_accel; re-creating it for $accel" >&2
  rm -rf "$venv"
fi
if [ -x "$venv/bin/python" ] && [ "$have_sha" = "$want_sha" ] && supported "$venv/bin/python" >/dev/null 2>&1; then
  exit 0
fi

if [ "$accel" = cpu ]; then reqs=(-r requirements.txt); else reqs=(-r "requirements-$accel.txt"); fi
[ "$test" = 0 ] || reqs+=(-r requirements-test.txt)
echo "setup: installing the pinned $accel$([ "$test" = 0 ] || echo ' + test') packages into $venv" >&2
if [ ! -x "$venv/bin/python" ] || ! supported "$venv/bin/python" >/dev/null 2>&1; then
  echo "setup: creating $venv with $python (first run: a few minutes, TensorFlow is large)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
fi
# pip installs only what is missing or pinned differently; then the project itself, its dependencies being
# exactly the pinned ones just installed.
"$venv/bin/python" -m pip install --quiet "${reqs[@]}"
"$venv/bin/python" -m pip install --quiet --quiet --no-deps -e .  # -qq: setuptools' editable-mode banner
echo "$accel $test $want_sha" > "$stamp"
