#!/usr/bin/env bash
# A Cloud TPU pod slice from a workstation with gcloud, one subcommand per operation:
#
#   export TPU_NAME=atss ZONE=us-central2-b ACCELERATOR=v4-32 [RUNTIME=tpu-ubuntu2204-base] [SPOT=1]
#   bash scripts/launch/tpu_pod.sh [--dry_run] create             # queued resource; waits until it is ACTIVE
#   bash scripts/launch/tpu_pod.sh [--dry_run] install            # this checkout (git HEAD) + the TPU packages
#   bash scripts/launch/tpu_pod.sh [--dry_run] train CONFIG WORKDIR [FLAGS...]   # on every worker, detached
#   bash scripts/launch/tpu_pod.sh [--dry_run] logs [WORKER]      # follow a worker's log (default 0)
#   bash scripts/launch/tpu_pod.sh [--dry_run] kill               # stop the trainer on every worker
#   bash scripts/launch/tpu_pod.sh [--dry_run] delete             # delete the slice and its queued resource
#   bash scripts/launch/tpu_pod.sh [--dry_run] relaunch           # after a preemption: delete, create,
#                                                                 # install, train again (the workdir resumes)
#
# WORKDIR and the data dir should be gs:// paths: workers' disks go with the slice. `train` runs
#   python -m atss_jax.main --config=CONFIG --workdir=WORKDIR --distributed=on FLAGS
# under nohup on all workers (a dropped ssh does not stop it), logging to ~/atss_train.log on each, and
# records it here, in ~/.atss_tpu_pod/TPU_NAME.cmd, for `relaunch` (a preempted slice's disks are gone).
# Run from the repository root.
# --dry_run prints every command instead of running it.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == --dry_run ]]; then dry_run=1; shift; fi
action=${1:-}
[[ -n "$action" ]] && shift
for variable in TPU_NAME ZONE; do
  if [[ -z "${!variable:-}" ]]; then echo "tpu_pod.sh: set $variable (see the header of this script)" >&2; exit 2; fi
done
runtime=${RUNTIME:-tpu-ubuntu2204-base}
log='~/atss_train.log'
recorded="$HOME/.atss_tpu_pod/$TPU_NAME.cmd"

run() {
  if (( dry_run )); then printf '%q ' "$@"; echo; else "$@"; fi
}

on_workers() {  # on_workers WORKERS COMMAND: COMMAND through ssh on the given workers ("all" or an index)
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$1" --command="$2"
}

create() {
  if [[ -z "${ACCELERATOR:-}" ]]; then echo "tpu_pod.sh: set ACCELERATOR (e.g. v4-32)" >&2; exit 2; fi
  local spot=()
  [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
  run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --runtime-version="$runtime" ${spot[@]+"${spot[@]}"}
  if (( dry_run )); then
    echo "# then polls: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$ZONE until ACTIVE"
    return
  fi
  local state=""
  until [[ "$state" == ACTIVE ]]; do
    sleep 30
    state=$(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" --format='value(state.state)')
    echo "tpu_pod.sh: $TPU_NAME is $state"
    if [[ "$state" == FAILED || "$state" == SUSPENDED ]]; then exit 1; fi
  done
}

install() {
  # This checkout's HEAD, copied to every worker: the code that trains is the code that was tested here.
  local archive=/tmp/atss-jax.tar.gz
  run git archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":~/atss-jax.tar.gz --zone="$ZONE" --worker=all
  # The runtime image's python3 is 3.10; JAX 0.10 needs 3.11.
  on_workers all "sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv && \
rm -rf ~/atss-jax && mkdir ~/atss-jax && tar -xzf ~/atss-jax.tar.gz -C ~/atss-jax && \
cd ~/atss-jax && PYTHON=python3.11 bash scripts/setup.sh tpu"
}

train() {
  if [[ $# -lt 2 ]]; then echo "tpu_pod.sh train CONFIG WORKDIR [FLAGS...]" >&2; exit 2; fi
  local config=$1 workdir=$2
  shift 2
  local command
  printf -v command '%q ' .venv/bin/python -m atss_jax.main --config="$config" --workdir="$workdir" \
    --distributed=on "$@"
  if (( dry_run )); then
    echo "# records the command in $recorded"
  else
    mkdir -p "$(dirname "$recorded")"
    echo "$command" >"$recorded"
  fi
  start "$command"
}

start() {  # start COMMAND: runs it detached on every worker
  on_workers all "cd ~/atss-jax && nohup $1 >> $log 2>&1 < /dev/null & echo started on \$(hostname)"
}

case "$action" in
  create) create ;;
  install) install ;;
  train) train "$@" ;;
  logs) on_workers "${1:-0}" "tail -n 100 -f $log" ;;
  # A trainer left running holds the TPU chips: the next launch could not start.
  # ([a]: the pattern must not match the remote shell's own command line.)
  kill) on_workers all "pkill -TERM -f '[a]tss_jax.main'; sleep 10; pkill -KILL -f '[a]tss_jax.main'; true" ;;
  delete) run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" --force --quiet ;;
  relaunch)
    if [[ ! -f "$recorded" ]]; then echo "tpu_pod.sh: no train command recorded in $recorded" >&2; exit 2; fi
    command=$(cat "$recorded")
    run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" --force --quiet
    create
    install
    start "$command"
    ;;
  *) echo "tpu_pod.sh: [--dry_run] create|install|train CONFIG WORKDIR [FLAGS...]|logs [WORKER]|kill|delete|relaunch" >&2
     exit 2 ;;
esac
