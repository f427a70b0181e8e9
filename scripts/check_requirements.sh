#!/usr/bin/env bash
# CI: every install set must resolve, so that a broken pin fails here and not on a user's machine. For each set
# (cpu, cpu + test, cuda12, tpu, k8s; Python 3.11 to 3.13; macOS on Apple silicon) pip's own resolver runs in
# dry-run mode, in a throwaway virtual environment, installing nothing: once on the pinned requirement file
# together with pyproject.toml's matching extra (what scripts/setup.sh installs, and the pins must lie in
# pyproject's ranges), once on the extra alone (what `pip install -e .[extra]` picks). Other platforms than
# this machine's are resolved with --platform/--python-version/--only-binary=:all:, and with the environment
# markers evaluated for that platform (pip evaluates them for the running interpreter even with --platform,
# so a small wrapper sets pip's marker environment to the target's). Sdist-only dependencies (promise) are
# built here once as wheels and offered to those runs. Needs only the package index: pip reads the wheels'
# metadata (PEP 658) and downloads no large wheel. Takes about two to four minutes (14 resolutions). Exit status 1 names the sets
# that did not resolve. PYTHON picks the interpreter (default: python3, 3.11+).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored" || true
mkdir "$tmp/wheels" "$tmp/src"
# Resolved from a copy: building the editable metadata writes atss_jax.egg-info next to pyproject.toml.
tar -c --exclude=__pycache__ pyproject.toml README.md requirements*.txt atss_jax configs scripts | tar -x -C "$tmp/src"
cd "$tmp/src"
# The build backend (pyproject's build-system.requires) once, rather than in an isolated build env per run.
mapfile -t backend < <("$py" -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")')
"$py" -m pip install --quiet "${backend[@]}" 2>&1 | grep -v "is ignored" || true

cat > "$tmp/resolve.py" <<'PY'
"""`pip ...` with the environment markers of TARGET_MARKERS (JSON), if set, instead of this interpreter's."""
import json
import os
import sys

import pip._vendor.packaging.markers as markers

target = json.loads(os.environ.get("TARGET_MARKERS") or "{}")
if target:
    host = markers.default_environment
    markers.default_environment = lambda: {**host(), **target}
    # Fail loudly if a pip release stops evaluating markers through this function.
    assert all(markers.Marker(f'{k} == "{v}"').evaluate() for k, v in target.items()), "marker override failed"
from pip._internal.cli.main import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
PY

linux_platforms=()
for minor in $(seq 35 -1 5); do linux_platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
linux_platforms+=(--platform manylinux2014_x86_64)  # and pip adds manylinux2010/manylinux1

# resolve DIR TARGET PYVER [--no-torch] -- PIP ARGS: resolves in DIR (a copy of the project), writes DIR/result.
# TARGET is native (this machine), linux (x86_64; glibc up to 2.35, Ubuntu 22.04's, as on GPU boxes and TPU
# VMs) or macos (arm64, macOS 14).
resolve() {
  local dir=$1 target=$2 pyver=$3 no_torch=0 t0=$SECONDS markers="" plat=() n
  shift 3
  [ "$1" = --no-torch ] && { no_torch=1; shift; }
  [ "$1" = -- ] && shift
  case "$target" in
    native) ;;
    linux) plat=("${linux_platforms[@]}")
           markers='"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"' ;;
    macos) plat=(--platform macosx_14_0_arm64)
           markers='"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64"' ;;
  esac
  if [ "$target" != native ]; then
    plat+=(--python-version "$pyver" --implementation cp --abi "cp${pyver/./}" --only-binary=:all:
           --find-links "$tmp/wheels")
    markers="{$markers, \"os_name\": \"posix\", \"python_version\": \"$pyver\", \"python_full_version\": \"$pyver.0\"}"
  fi
  if (cd "$dir" && TARGET_MARKERS="$markers" "$py" "$tmp/resolve.py" install --dry-run --ignore-installed \
        --quiet --no-build-isolation --report report.json "${plat[@]}" "$@") > "$dir/log.txt" 2>&1; then
    if [ "$no_torch" = 1 ] && "$py" -c 'import json, sys
sys.exit(not any(i["metadata"]["name"].lower() == "torch" for i in json.load(open(sys.argv[1]))["install"]))' \
         "$dir/report.json"; then
      echo "FAIL: pulls torch, which only the test set may bring" > "$dir/result"
    else
      n=$("$py" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["install"]))' "$dir/report.json")
      printf 'ok %3d packages %3d s\n' "$n" $((SECONDS - t0)) > "$dir/result"
    fi
  else
    { echo "FAIL: pip install --dry-run $* does not resolve:"
      grep -v "is ignored" "$dir/log.txt" | tail -n 15 | sed 's/^/      /'; } > "$dir/result"
  fi
}

# Runs the set NAME in the background, two at a time (a run is about half index fetches, half CPU).
names=()
check() {
  local name=$1 dir="$tmp/set${#names[@]}"
  shift
  names+=("$name")
  cp -r "$tmp/src" "$dir"
  while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n || true; done
  resolve "$dir" "$@" &
}

echo "check_requirements: resolving every install set (pip $("$py" -m pip --version | cut -d' ' -f2), dry run)"
# This machine first, sdists allowed: the sdist-only dependencies found are built as wheels for the other runs.
check "cpu+test: requirements-test.txt, this machine" native "" -- -r requirements-test.txt
wait
mapfile -t sdists < <("$py" -c 'import json, sys
for i in json.load(open(sys.argv[1]))["install"]:
    if not i["download_info"]["url"].endswith(".whl"):
        print(i["metadata"]["name"] + "==" + i["metadata"]["version"])' "$tmp/set0/report.json" 2>/dev/null || true)
if [ "${#sdists[@]}" -gt 0 ]; then
  "$py" -m pip wheel --quiet --no-deps -w "$tmp/wheels" "${sdists[@]}" 2>&1 | grep -v "is ignored" || true
fi

for set in cpu test cuda12 tpu; do
  case "$set" in
    cpu) file=requirements.txt; project=.; flag=(--no-torch) ;;
    test) file=requirements-test.txt; project=".[test]"; flag=() ;;
    *) file="requirements-$set.txt"; project=".[$set]"; flag=(--no-torch) ;;
  esac
  check "$set: $file + -e $project, linux py3.11" linux 3.11 "${flag[@]}" -- -r "$file" -e "$project"
  check "$set: -e $project, linux py3.11" linux 3.11 "${flag[@]}" -- -e "$project"
done
# Kubernetes: the CPU pins plus the extra that lets JAX read an indexed Job (the kubernetes package).
check "k8s: requirements.txt + -e .[k8s], linux py3.11" linux 3.11 --no-torch -- -r requirements.txt -e ".[k8s]"
for pyver in 3.12 3.13; do
  check "test: requirements-test.txt + -e .[test], linux py$pyver" linux "$pyver" -- \
    -r requirements-test.txt -e ".[test]"
done
check "test: requirements-test.txt + -e .[test], macos-arm64 py3.11" macos 3.11 -- \
  -r requirements-test.txt -e ".[test]"
check "test: -e .[test], macos-arm64 py3.11" macos 3.11 -- -e ".[test]"
wait

failed=()
for i in "${!names[@]}"; do
  result=$(cat "$tmp/set$i/result" 2>/dev/null || echo "FAIL: no result")
  case "$result" in
    ok*) printf 'ok    %-62s %s\n' "${names[$i]}" "${result#ok }" ;;
    *) printf 'FAIL  %s: %s\n' "${names[$i]}" "${result#FAIL: }"; failed+=("${names[$i]}") ;;
  esac
done
[ "${#sdists[@]}" -eq 0 ] || echo "      (sdist-only, built here as wheels for the other platforms: ${sdists[*]})"
echo "check_requirements: $((SECONDS - start)) s"
if [ "${#failed[@]}" -gt 0 ]; then
  echo "check_requirements: FAILED, these sets do not resolve:" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "check_requirements: every set resolves"
