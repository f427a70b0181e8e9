#!/usr/bin/env bash
# The accelerator evidence in one run (at most 8 minutes on one GPU): prints the accelerator, then runs
#   train_bfloat16   benchmark_train, configs/base.py, 800x1344, 16 images per device (8 if 16 runs out of memory)
#   train_float32    the same in float32
#   dcn_bfloat16     benchmark_dcn in bfloat16 (the head's P3 level at 800x1344)
#   peer             scripts/benchmark_peer.py on the GPU, once it has landed (else recorded as "not landed")
#   peer_bfloat16    the same with --dtype=bfloat16 (ours bfloat16 compute, mmdetection torch.autocast)
#   predict          scripts/benchmark_predict.py, once it has landed (else recorded as "not landed")
# each under `timeout`, and collects everything into DIR/accelerator_check.json (the benchmarks' own JSON,
# per attempt: exit status, seconds, out-of-memory, the end of stderr), DIR/accelerator_check.md (the table it
# prints) and DIR/accelerator_check.log (every attempt's output). A failing or timed-out step is recorded and
# the next one runs; the exit status is non-zero only when no step succeeded.
#
#   bash scripts/accelerator_check.sh [--out DIR]          # on the accelerator; DIR: $OUT if set, else
#                                                          # accelerator_results/
#   bash scripts/accelerator_check.sh --smoke [--out DIR]  # the same path on CPU at a tiny size (the CI test)
#   bash scripts/accelerator_check.sh --fetch_wheels       # here, with PyPI: the wheels the device lacks -> .whl/
#
# The benchmark path imports no TensorFlow, TFDS or clu (synthetic batches; atss_jax.train_step, not the loop).
# Packages missing on the machine travel as wheels in .whl/: when .whl/ exists and a module of REQUIRED is
# missing, they are installed into /tmp/site and PYTHONPATH points there. Python: $PYTHON, else .venv/bin/python
# where it exists, else python3.
#
# Scripts that land later are run with these flags, which they must accept:
#   scripts/benchmark_peer.py     --device=gpu --out=FILE          (smoke: --device=cpu --smoke --profile --out=FILE)
#   scripts/benchmark_predict.py  --out=FILE                       (smoke: --smoke --out=FILE)
# FILE is a JSON object; its "images_per_second", "mfu", "peak_memory_gib" and "batch_per_device", where present,
# go into the table. Their extra packages go into WHEELS below.
#
# Other options: --only=STEP,STEP (run these of the steps above, in their order; the budget is shared by them);
# --budget_s=N (the steps' seconds, shared out by weight; default 480; a smoke run has none unless given, so
# that a slow or busy machine never cuts a step short: its steps only stop at the hang guard, an hour each);
# --allow_cpu (without it, a full run whose jax sees no accelerator runs nothing, records the commands and
# exits 1, rather than spend the machine's minutes on a CPU); --simulate_oom=DTYPE (the first train attempt in
# DTYPE reports out-of-memory without running, to exercise the fallback); --simulate_hang=STEP (STEP sleeps
# until its limit stops it, to exercise the budget). The CI tests use both.
set -uo pipefail

# What the device lacks for the benchmark path (flax, optax, orbax, absl-py, etils, PyYAML are there), then for
# the peer: mmdetection and what it imports that the device's image (torch, opencv, scipy, matplotlib) lacks.
WHEELS=(ml_collections==1.1.0 mmdet==3.3.0 mmengine==0.10.7 mmcv-lite==2.2.0 pycocotools==2.0.11 shapely==2.2.0
        terminaltables==3.1.10 addict==2.4.0 termcolor==3.3.0 yapf==0.43.0 platformdirs==4.14.9)
# Modules the benchmark path imports; a missing one makes the run install .whl/.
REQUIRED=(jax flax optax absl etils yaml numpy ml_collections)
# A step's limit without a budget: it only stops a hung step (the slowest smoke step seen took about two
# minutes, on a busy 2-core machine).
HANG_GUARD_S=3600
WHEEL_LIMIT_MIB=40

SMOKE=0
ALLOW_CPU=0
FETCH=0
SIMULATE_OOM=""
SIMULATE_HANG=""
BUDGET=""
ONLY=""
OUT_DIR="${OUT:-accelerator_results}"
while (($#)); do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --fetch_wheels) FETCH=1 ;;
    --allow_cpu) ALLOW_CPU=1 ;;
    --out) OUT_DIR="${2:?--out needs a folder}"; shift ;;
    --out=*) OUT_DIR="${1#--out=}" ;;
    --budget_s=*) BUDGET="${1#--budget_s=}" ;;
    --only=*) ONLY="${1#--only=}" ;;
    --simulate_oom=*) SIMULATE_OOM="${1#--simulate_oom=}" ;;
    --simulate_hang=*) SIMULATE_HANG="${1#--simulate_hang=}" ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "accelerator_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ "$OUT_DIR" != /* ]]; then OUT_DIR="$PWD/$OUT_DIR"; fi
cd "$(dirname "$0")/.." || exit 2

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3
fi

if ((FETCH)); then
  exclude="$(git rev-parse --git-path info/exclude 2>/dev/null || true)"
  if [[ -n "$exclude" ]] && ! grep -qxF '/.whl/' "$exclude" 2>/dev/null; then
    mkdir -p "$(dirname "$exclude")" && echo /.whl/ >>"$exclude"
  fi
  mkdir -p .whl
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}" || exit 1
  echo "Wheels in .whl/ (each one's Requires-Dist, extras left out: the device must have them or they go in WHEELS):"
  for wheel in .whl/*.whl; do
    echo "  $(basename "$wheel")  $(du -k "$wheel" | cut -f1) KiB"
    unzip -p "$wheel" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' | sed 's/^/      /'
  done
  total_kib=$(du -sk .whl | cut -f1)
  echo "Total: $((total_kib / 1024)) MiB ($total_kib KiB); limit $WHEEL_LIMIT_MIB MiB."
  if ((total_kib > WHEEL_LIMIT_MIB * 1024)); then
    echo "accelerator_check: .whl/ is over $WHEEL_LIMIT_MIB MiB; the working tree must stay under 64 MiB." >&2
    exit 1
  fi
  echo "On the accelerator machine, with .whl/ copied beside the repository's files:"
  echo "  bash scripts/accelerator_check.sh"
  exit 0
fi

mkdir -p "$OUT_DIR" || exit 2
WORK="$(mktemp -d "${TMPDIR:-/tmp}/accelerator_check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT
ATTEMPTS="$WORK/attempts.tsv"
: >"$ATTEMPTS"
export PYTHONUNBUFFERED=1  # the benchmarks' progress lines reach the log before a timeout
MODE=full
if ((SMOKE)); then
  MODE=smoke
  export JAX_PLATFORMS=cpu
  # XLA:CPU compiles about twice as fast without LLVM's optimisations; the tiny steps hardly run slower.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
  # No budget unless given: the smoke run checks that every step works, not that this machine is fast.
else
  BUDGET="${BUDGET:-480}"
  # One GPU, one benchmark at a time: let it have the card's memory (JAX takes 75% by default).
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
fi

# Wheels: installed only when something the benchmark path imports is missing.
missing_modules() {
  "$PY" -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' \
    "${REQUIRED[@]}"
}
MISSING="$(missing_modules)"
WHEEL_NOTE="none needed"
if [[ -n "$MISSING" ]]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl >"$WORK/wheels.log" 2>&1; then
      export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
      WHEEL_NOTE="installed into /tmp/site for: $MISSING ($(printf '%s ' .whl/*.whl))"
    else
      WHEEL_NOTE="pip install of .whl/ failed: $(tail -n 3 "$WORK/wheels.log" | tr '\n' ' ')"
    fi
    MISSING="$(missing_modules)"
  else
    WHEEL_NOTE="missing and no .whl/ to install from: $MISSING"
  fi
fi

echo "== accelerator_check ($MODE), results in $OUT_DIR, budget ${BUDGET:+$BUDGET s}${BUDGET:-none (hang guard $HANG_GUARD_S s a step)}"
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 30 nvidia-smi -L 2>&1 | tee "$WORK/nvidia_smi.txt"
  timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 \
    | tee -a "$WORK/nvidia_smi.txt"
else
  echo "no nvidia-smi" | tee "$WORK/nvidia_smi.txt"
fi
timeout 120 "$PY" - "$WORK/environment.json" <<'EOF' 2>"$WORK/environment.err"
import importlib.metadata, json, platform, sys

import jax

def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None

devices = jax.devices()
environment = {
    "python": platform.python_version(), "backend": jax.default_backend(), "device_count": len(devices),
    "device_kind": devices[0].device_kind, "devices": [str(d) for d in devices],
    "versions": {name: version(name) for name in (
        "jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
        "ml_collections", "numpy", "torch")},
}
print(f"jax {jax.__version__} on {environment['backend']}: {len(devices)} x {environment['device_kind']} "
      f"({', '.join(environment['devices'])}); Python {environment['python']}")
print("versions: " + ", ".join(f"{k} {v}" for k, v in environment["versions"].items() if v))
with open(sys.argv[1], "w") as f:
    json.dump(environment, f, indent=1)
EOF
env_rc=$?
if ((env_rc)); then
  echo "accelerator_check: could not start jax (exit $env_rc):"
  tail -n 20 "$WORK/environment.err"
fi
echo "wheels: $WHEEL_NOTE"
NO_ACCELERATOR=0
if ((!SMOKE && !ALLOW_CPU)) && grep -q '"backend": "cpu"' "$WORK/environment.json" 2>/dev/null; then
  echo "accelerator_check: jax sees no accelerator (backend cpu): nothing runs (--allow_cpu runs it anyway)."
  NO_ACCELERATOR=1
fi

# The steps: name, weight (its share of the budget), then how to run it (set by step_command below).
if ((SMOKE)); then
  TRAIN_FLAGS=(--config=configs/demo.py:tiny --steps=1)
  BATCH=2; FALLBACK=1
  DCN_FLAGS=(--height=12 --width=16 --channels=8 --groups=2 --batch=1 --repeats=2)
  PEER_FLAGS=(--device=cpu --smoke --profile)
  PREDICT_FLAGS=(--smoke)
else
  TRAIN_FLAGS=(--config=configs/base.py --steps=6)
  BATCH=16; FALLBACK=8
  DCN_FLAGS=()
  PEER_FLAGS=(--device=gpu)
  PREDICT_FLAGS=()
fi
STEPS=(train_bfloat16 train_float32 dcn_bfloat16 peer peer_bfloat16 predict)
# The smoke run leaves out peer_bfloat16 by default: the same script and path as peer, a minute more of CI.
((SMOKE)) && [[ -z "$ONLY" ]] && STEPS=(train_bfloat16 train_float32 dcn_bfloat16 peer predict)
declare -A WEIGHT=([train_bfloat16]=160 [train_float32]=130 [dcn_bfloat16]=30 [peer]=90 [peer_bfloat16]=80
                   [predict]=40)
declare -A SCRIPT=([train_bfloat16]=benchmark_train [train_float32]=benchmark_train [dcn_bfloat16]=benchmark_dcn
                   [peer]=benchmark_peer [peer_bfloat16]=benchmark_peer [predict]=benchmark_predict)
if [[ -n "$ONLY" ]]; then
  for name in ${ONLY//,/ }; do
    if [[ -z "${WEIGHT[$name]:-}" ]]; then
      echo "accelerator_check: --only: unknown step $name (steps: ${STEPS[*]})" >&2
      exit 2
    fi
  done
  SELECTED=()
  for name in "${STEPS[@]}"; do
    [[ ",$ONLY," == *",$name,"* ]] && SELECTED+=("$name")
  done
  STEPS=("${SELECTED[@]}")
fi

# One line of attempts.tsv: name, script, kind (ran|not_landed|skipped|no_accelerator), batch, exit status,
# seconds, limit, JSON, log, command.
record() {
  local IFS=$'\t'
  echo "$*" >>"$ATTEMPTS"
}

# Sets CMD to the command of step $1 at per-device batch $2, writing JSON $3.
step_command() {
  local name=$1 batch=$2 json=$3
  case "$name" in
    train_*) CMD=("$PY" -m scripts.benchmark_train "${TRAIN_FLAGS[@]}" "--batch_per_device=$batch"
                  "--config.model.dtype=${name#train_}" "--out=$json") ;;
    dcn_bfloat16) CMD=("$PY" -m scripts.benchmark_dcn "${DCN_FLAGS[@]}" --dtype=bfloat16 "--out=$json") ;;
    peer) CMD=("$PY" -m scripts.benchmark_peer "${PEER_FLAGS[@]}" "--out=$json") ;;
    peer_bfloat16) CMD=("$PY" -m scripts.benchmark_peer "${PEER_FLAGS[@]}" --dtype=bfloat16 "--out=$json") ;;
    predict) CMD=("$PY" -m scripts.benchmark_predict "${PREDICT_FLAGS[@]}" "--out=$json") ;;
  esac
  if [[ -n "$SIMULATE_OOM" && "$name" == "train_$SIMULATE_OOM" && "$batch" == "$BATCH" ]]; then
    CMD=(bash -c 'echo "RESOURCE_EXHAUSTED: Out of memory (simulated by --simulate_oom)" >&2; exit 1')
  elif [[ "$name" == "$SIMULATE_HANG" ]]; then
    CMD=(sleep "$HANG_GUARD_S")
  fi
}

# Seconds for the next attempt of the step at position $1: its weight's share of what is left of the budget,
# over itself and the steps after it that will run.
step_limit() {
  local i=$1 total=0 j
  if [[ -z "$BUDGET" ]]; then
    echo "$HANG_GUARD_S"
    return
  fi
  for ((j = i; j < ${#STEPS[@]}; j++)); do
    [[ -e "scripts/${SCRIPT[${STEPS[j]}]}.py" ]] && total=$((total + ${WEIGHT[${STEPS[j]}]}))
  done
  local left=$((BUDGET - (SECONDS - START)))
  echo $((left * ${WEIGHT[${STEPS[i]}]} / (total > 0 ? total : 1)))
}

# The budget starts with the first step (starting jax above is not shared out).
START=$SECONDS
for ((i = 0; i < ${#STEPS[@]}; i++)); do
  name=${STEPS[i]}
  if [[ ! -e "scripts/${SCRIPT[$name]}.py" ]]; then
    record "$name" "${SCRIPT[$name]}" not_landed "" "" 0 0 "" "" ""
    echo "== $name: not landed (no scripts/${SCRIPT[$name]}.py)"
    continue
  fi
  batch=""
  [[ "$name" == train_* ]] && batch=$BATCH
  for attempt in 1 2; do
    limit=$(step_limit "$i")
    json="$WORK/$name.$attempt.json"
    log="$WORK/$name.$attempt.log"
    step_command "$name" "$batch" "$json"
    if ((NO_ACCELERATOR)); then
      record "$name" "${SCRIPT[$name]}" no_accelerator "$batch" "" 0 0 "" "" "${CMD[*]}"
      break
    elif ((limit < 15)); then
      record "$name" "${SCRIPT[$name]}" skipped "$batch" "" 0 "$limit" "" "" "${CMD[*]}"
      echo "== $name: skipped, only $limit s of the budget left"
      break
    fi
    echo "== $name (${batch:+batch/device $batch, }limit $limit s): ${CMD[*]}"
    begin=$SECONDS
    timeout -k 10 "$limit" "${CMD[@]}" >"$log" 2>&1
    rc=$?
    seconds=$((SECONDS - begin))
    record "$name" "${SCRIPT[$name]}" ran "$batch" "$rc" "$seconds" "$limit" "$json" "$log" "${CMD[*]}"
    if ((rc == 0)); then
      echo "   ok in $seconds s"
      break
    fi
    echo "   exit $rc after $seconds s$( ((rc == 124 || rc == 137)) && echo ' (timed out)'):"
    tail -n 5 "$log" | sed 's/^/   | /'
    if [[ "$name" == train_* && $attempt == 1 ]] && grep -qE 'RESOURCE_EXHAUSTED|[Oo]ut of memory' "$log"; then
      echo "   out of memory at $batch images/device: again with $FALLBACK"
      batch=$FALLBACK
      continue
    fi
    break
  done
done

"$PY" - "$WORK" "$OUT_DIR" "$MODE" "$((SECONDS - START))" "${BUDGET:-none}" "$WHEEL_NOTE" "$MISSING" <<'EOF'
"""Collects the attempts into accelerator_check.json, .md and .log; exits 1 when no step succeeded."""
import json
import os
import sys

work, out_dir, mode, seconds, budget, wheel_note, missing = sys.argv[1:8]
TAIL_LINES, LOG_LINES = 25, 400


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


environment = load_json(os.path.join(work, "environment.json")) or {
    "error": read(os.path.join(work, "environment.err"))[-3000:]}
environment["nvidia_smi"] = read(os.path.join(work, "nvidia_smi.txt")).strip()
environment["wheels"] = wheel_note
environment["missing_modules"] = missing.split()

steps, log_parts = {}, []
for line in read(os.path.join(work, "attempts.tsv")).splitlines():
    name, script, kind, batch, rc, secs, limit, json_path, log_path, command = line.split("\t")
    step = steps.setdefault(name, {"name": name, "script": f"scripts/{script}.py", "attempts": []})
    if kind != "ran":
        step["status"] = {"not_landed": "not landed", "skipped": "skipped: budget spent",
                          "no_accelerator": "skipped: no accelerator"}[kind]
        if command:
            step["command"] = command
        continue
    rc = int(rc)
    log = read(log_path)
    result = load_json(json_path) if rc == 0 else None
    status = "ok" if result is not None else ("timeout" if rc in (124, 137) else "failed")
    attempt = {"batch_per_device": int(batch) if batch else None, "exit_status": rc, "seconds": int(secs),
               "limit_seconds": int(limit), "status": status, "command": command,
               "out_of_memory": "RESOURCE_EXHAUSTED" in log or "ut of memory" in log}
    if status != "ok":
        attempt["stderr_tail"] = "\n".join(log.splitlines()[-TAIL_LINES:])
    step["attempts"].append(attempt)
    step["status"], step["result"] = status, result
    lines = log.splitlines()
    log_parts.append(f"===== {name}, batch/device {batch}, exit {rc}, {secs} s: {command}\n"
                     + ("[... first lines left out ...]\n" if len(lines) > LOG_LINES else "")
                     + "\n".join(lines[-LOG_LINES:]) + "\n")

for step in steps.values():
    tried = step["attempts"]
    if tried:
        step["batch_per_device"] = tried[-1]["batch_per_device"]
        if len(tried) > 1:
            step["fallback"] = (f"{tried[0]['batch_per_device']} images/device ran out of memory; "
                                f"{tried[-1]['batch_per_device']} used")

results = {"mode": mode, "seconds": int(seconds), "budget_seconds": None if budget == "none" else int(budget),
           "environment": environment,
           "steps": list(steps.values())}


def number(value, digits=3):
    return f"{value:.{digits}g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


device = environment.get("device_kind", "?")
lines = [f"Accelerator check ({mode}): {environment.get('device_count', '?')} x {device}, "
         f"backend {environment.get('backend', '?')}, jax {environment.get('versions', {}).get('jax', '?')}, "
         f"Python {environment.get('python', '?')}; {seconds} s, budget {budget}{'' if budget == 'none' else ' s'}. "
         f"MFU is against the device's dense bf16 peak (benchmark_train's table), in float32 too.", "",
         "| step | status | batch/device | images/s | step ms | MFU | assignment share | peak GiB | compile s | "
         "note |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
for step in steps.values():
    result = step.get("result") or {}
    note = step.get("fallback", "")
    if step["name"].startswith("dcn") and result.get("rows"):
        note = "; ".join(f"{row['pass']}: dcnv2 {row['dcnv2_ms']:.3g} ms vs conv3x3 {row['conv3x3_ms']:.3g} ms "
                         f"({row['ratio']:.2f}x), temp {row['dcnv2_temp_mib']:.0f} MiB" for row in result["rows"])
    elif step["status"] not in ("ok", "not landed") and step["attempts"]:
        tail = step["attempts"][-1].get("stderr_tail", "").strip().splitlines()
        errors = [line for line in tail if "Error" in line or "RESOURCE_EXHAUSTED" in line]
        note = (note + "; " if note else "") + ((errors or tail)[-1][:160] if tail else "")
    share = result.get("assignment_share")
    batch = step.get("batch_per_device") or result.get("batch_per_device") or "-"
    lines.append(f"| {step['name']} | {step['status']} | {batch} | "
                 f"{number(result.get('images_per_second'))} | {number(result.get('step_ms'))} | "
                 f"{number(result.get('mfu'))} | {f'{100 * share:.2f}%' if isinstance(share, float) else '-'} | "
                 f"{number(result.get('peak_memory_gib'))} | {number(result.get('compile_seconds'))} | "
                 f"{note.replace('|', '/')} |")
table = "\n".join(lines) + "\n"
results["table"] = table
with open(os.path.join(out_dir, "accelerator_check.json"), "w") as f:
    json.dump(results, f, indent=1)
with open(os.path.join(out_dir, "accelerator_check.md"), "w") as f:
    f.write(table)
with open(os.path.join(out_dir, "accelerator_check.log"), "w") as f:
    f.write("".join(log_parts))
print()
print(table)
print(f"Wrote {out_dir}/accelerator_check.json, .md and .log")
sys.exit(0 if any(step["status"] == "ok" for step in steps.values()) else 1)
EOF
