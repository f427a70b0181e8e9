#!/usr/bin/env bash
# Trains on a SLURM GPU cluster, used as mmdetection's tools/slurm_train.sh is:
#
#   [GPUS=16] [GPUS_PER_NODE=8] [LAYOUT=node] [CPUS_PER_GPU=8] [PYTHON=python] [SRUN_ARGS="..."] \
#       bash scripts/launch/slurm_train.sh [--sbatch] [--dry_run] PARTITION JOB_NAME CONFIG WORKDIR [FLAGS...]
#
#   FLAGS go to atss_jax.main (e.g. --config.data.data_dir=/data/tfds --config.assigner.topk=7).
#   LAYOUT=node: one process per node driving its GPUS_PER_NODE GPUs (one input pipeline per node);
#   LAYOUT=gpu: one process per GPU. atss_jax.cluster reads either from srun's variables.
#   Default: srun in the foreground (from a login node, or inside salloc). --sbatch submits a batch job
#   instead, whose log is slurm_logs/JOB_NAME-<job id>.out; it requeues itself when the trainer was
#   preempted (exit 143 after saving), and the requeued job resumes from the workdir.
#   --dry_run prints the command instead of running it.
#
# Run it from the repository root, with the environment that has atss-jax installed active (or PYTHON set).
set -euo pipefail

submit=srun
dry_run=0
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --sbatch) submit=sbatch ;;
    --dry_run) dry_run=1 ;;
    *) echo "slurm_train.sh: unknown option $1 (--sbatch, --dry_run)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 4 ]]; then
  echo "usage: [GPUS=16] [GPUS_PER_NODE=8] [LAYOUT=node|gpu] bash scripts/launch/slurm_train.sh [--sbatch]" \
       "[--dry_run] PARTITION JOB_NAME CONFIG WORKDIR [FLAGS...]" >&2
  exit 2
fi
partition=$1 job_name=$2 config=$3 workdir=$4
shift 4
gpus=${GPUS:-8}
gpus_per_node=${GPUS_PER_NODE:-$((gpus < 8 ? gpus : 8))}
cpus_per_gpu=${CPUS_PER_GPU:-8}
layout=${LAYOUT:-node}
python=${PYTHON:-python}
if (( gpus % gpus_per_node )); then
  echo "slurm_train.sh: GPUS=$gpus is not a multiple of GPUS_PER_NODE=$gpus_per_node" >&2
  exit 2
fi
nodes=$((gpus / gpus_per_node))
case "$layout" in
  node) tasks_per_node=1 cpus_per_task=$((cpus_per_gpu * gpus_per_node)) ;;
  gpu) tasks_per_node=$gpus_per_node cpus_per_task=$cpus_per_gpu ;;
  *) echo "slurm_train.sh: LAYOUT=$layout: use node (one process per node) or gpu (one per GPU)" >&2; exit 2 ;;
esac

step=(srun --partition="$partition" --job-name="$job_name" --nodes="$nodes" --ntasks-per-node="$tasks_per_node"
      --gres=gpu:"$gpus_per_node" --cpus-per-task="$cpus_per_task" --kill-on-bad-exit=1)
# SRUN_ARGS: extra srun options, split on spaces (e.g. SRUN_ARGS="--time=24:00:00 --exclusive").
read -r -a extra <<<"${SRUN_ARGS:-}"
step+=(${extra[@]+"${extra[@]}"} "$python" -u -m atss_jax.main --config="$config" --workdir="$workdir"
       --distributed=on "$@")

if [[ "$submit" == srun ]]; then
  command=("${step[@]}")
else
  printf -v step_line '%q ' "${step[@]}"
  # 143: the trainer saved a checkpoint on SIGTERM (preemption, or the time limit's signal): run again.
  batch="$step_line; status=\$?; if [ \$status -eq 143 ]; then scontrol requeue \$SLURM_JOB_ID; fi; exit \$status"
  command=(sbatch --partition="$partition" --job-name="$job_name" --nodes="$nodes"
           --ntasks-per-node="$tasks_per_node" --gres=gpu:"$gpus_per_node" --cpus-per-task="$cpus_per_task"
           --requeue --open-mode=append --signal=TERM@300 --output="slurm_logs/$job_name-%j.out"
           --wrap="$batch")
fi
if (( dry_run )); then
  printf '%q ' "${command[@]}"
  echo
  exit 0
fi
[[ "$submit" == sbatch ]] && mkdir -p slurm_logs
exec "${command[@]}"
