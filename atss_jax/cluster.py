"""Joining a multi-process job: which launcher started this process, which devices it drives, and
``jax.distributed.initialize()`` with both.

Launchers read from the environment (``detect_job``):
  SLURM (``srun``): SLURM_PROCID of SLURM_NTASKS, SLURM_LOCALID of the tasks on this node; JAX finds the
    coordinator on the step's first node.
  Open MPI (``mpirun``): OMPI_COMM_WORLD_RANK of OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK of
    OMPI_COMM_WORLD_LOCAL_SIZE; JAX finds the coordinator through OMPI_MCA_orte_hnp_uri, which Open MPI 5
    no longer exports: there, ``mpirun -x JAX_COORDINATOR_ADDRESS=<first host>:<port>``.
  Kubernetes (an indexed Job or a JobSet): JOB_COMPLETION_INDEX; JAX reads the rest from the Kubernetes API
    (the ``kubernetes`` package: ``pip install 'atss-jax[k8s]'``), or JAX_COORDINATOR_ADDRESS and
    JAX_NUM_PROCESSES set in the pod spec stand in for it.
  Any other (``JAX_COORDINATOR_ADDRESS``, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or the same three as flags.
  A Cloud TPU VM slice needs none of these: JAX finds it through the metadata server.

GPU layouts (``local_device_ids``): with one process per node a process drives every GPU of its node; with
one process per GPU (``srun --ntasks-per-node=8``, ``mpirun -np 16`` on two 8-GPU nodes) the process of local
rank r drives GPU r; with k processes per node and a multiple of k GPUs, each drives a contiguous block. A
launcher that binds GPUs to tasks itself (``srun --gpus-per-task=1``: each task's CUDA_VISIBLE_DEVICES names
its own GPU) leaves each process every GPU it can see. JAX's own rule (always GPU <local rank>) would give a
one-process-per-node job one GPU per node, and a task bound to one GPU a device that does not exist.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping, Sequence

import jax
from absl import logging

from atss_jax import errors


class ClusterError(errors.Refusal, ValueError):
    """A launch that cannot work as started; the message says what to change (printed alone, one line)."""


@dataclasses.dataclass(frozen=True)
class Job:
    """How this process belongs to a multi-process job.

    launcher: "slurm", "openmpi", "kubernetes" or "coordinator" (JAX_COORDINATOR_ADDRESS or the flags).
    jax_detection: the ``cluster_detection_method`` JAX reads the job with; None when the coordinator, the
      process count and this process's index are passed explicitly (``coordinator_address`` ...).
    local_rank, processes_on_node: this process among the job's processes on its node, where the launcher
      says (None: unknown).
    """

    launcher: str
    jax_detection: str | None = None
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_rank: int | None = None
    processes_on_node: int | None = None


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ClusterError(f"{name}={environ[name]!r} is not a whole number.") from None


def _optional_int(environ: Mapping[str, str], name: str) -> int | None:
    return _int(environ, name) if name in environ else None


def _missing(environ: Mapping[str, str], names: Sequence[str]) -> list[str]:
    return [name for name in names if name not in environ]


def _slurm_tasks_on_node(environ: Mapping[str, str]) -> int | None:
    """Tasks of this step on this node: SLURM_STEP_TASKS_PER_NODE ("8(x2)", "2,1") at SLURM_NODEID."""
    counts = []
    for part in environ.get("SLURM_STEP_TASKS_PER_NODE", environ.get("SLURM_TASKS_PER_NODE", "")).split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            return _optional_int(environ, "SLURM_NTASKS_PER_NODE")
        counts += [int(match[1])] * int(match[2] or 1)
    node = _optional_int(environ, "SLURM_NODEID")
    if node is not None and node < len(counts):
        return counts[node]
    return counts[0] if len(counts) == 1 else _optional_int(environ, "SLURM_NTASKS_PER_NODE")


# What JAX's SLURM detection reads; srun exports all of them to every task, sbatch's own shell only some.
_SLURM_TASK_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _slurm_job(environ: Mapping[str, str]) -> Job | None:
    missing = _missing(environ, _SLURM_TASK_VARIABLES)
    tasks = _optional_int(environ, "SLURM_NTASKS")
    if missing:
        if tasks is not None and tasks > 1:
            raise ClusterError(
                f"SLURM job {environ['SLURM_JOB_ID']} has {tasks} tasks but this process has no "
                f"{', '.join(missing)}: it was not started by srun. Start every task with srun (inside sbatch: "
                "srun python -m atss_jax.main ..., as scripts/launch/slurm_train.sh does).")
        logging.info("SLURM allocation without a multi-task step (%s unset): one process.", ", ".join(missing))
        return None
    if tasks == 1:
        return None
    return Job("slurm", "slurm", num_processes=tasks, process_id=_int(environ, "SLURM_PROCID"),
               local_rank=_int(environ, "SLURM_LOCALID"), processes_on_node=_slurm_tasks_on_node(environ))


def _coordinator_from_environment(environ: Mapping[str, str], launcher: str, process_id: int | None = None,
                                  num_processes: int | None = None) -> Job:
    """A job whose coordinator is JAX_COORDINATOR_ADDRESS; the launcher's own count and index win."""
    if num_processes is None:
        if "JAX_NUM_PROCESSES" not in environ:
            raise ClusterError("JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES is not: export both, and "
                               "JAX_PROCESS_ID for each process (or pass --num_processes and --process_id).")
        num_processes = _int(environ, "JAX_NUM_PROCESSES")
    if process_id is None:
        if "JAX_PROCESS_ID" not in environ:
            raise ClusterError("JAX_COORDINATOR_ADDRESS is set but JAX_PROCESS_ID is not: export it for each "
                               f"process (0 to {num_processes - 1}), or pass --process_id.")
        process_id = _int(environ, "JAX_PROCESS_ID")
    return Job(launcher, coordinator_address=environ["JAX_COORDINATOR_ADDRESS"], num_processes=num_processes,
               process_id=process_id)


def _openmpi_job(environ: Mapping[str, str]) -> Job | None:
    size = _int(environ, "OMPI_COMM_WORLD_SIZE")
    if size == 1:
        return None
    missing = _missing(environ, ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"))
    if missing:
        raise ClusterError(f"Open MPI set OMPI_COMM_WORLD_SIZE={size} but not {', '.join(missing)}.")
    rank, local = _int(environ, "OMPI_COMM_WORLD_RANK"), _optional_int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE")
    local_rank = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK")
    if "JAX_COORDINATOR_ADDRESS" in environ:
        job = _coordinator_from_environment(environ, "openmpi", rank, size)
    elif "OMPI_MCA_orte_hnp_uri" in environ:
        job = Job("openmpi", "ompi", num_processes=size, process_id=rank)
    else:
        raise ClusterError(
            f"Open MPI started {size} processes but exports no OMPI_MCA_orte_hnp_uri (Open MPI 5 and later do "
            "not), so JAX cannot find a coordinator: add -x JAX_COORDINATOR_ADDRESS=<first host>:<free port> to "
            "mpirun.")
    return dataclasses.replace(job, local_rank=local_rank, processes_on_node=local)


def _kubernetes_job(environ: Mapping[str, str], kubernetes_installed: bool) -> Job:
    index = _int(environ, "JOB_COMPLETION_INDEX")
    if "JAX_COORDINATOR_ADDRESS" in environ:
        job = _coordinator_from_environment(environ, "kubernetes", process_id=index)
    elif kubernetes_installed:
        job = Job("kubernetes", "k8s", process_id=index)
    else:
        raise ClusterError(
            f"This pod is index {index} of an indexed Kubernetes Job, but the kubernetes package JAX reads the "
            "job with is not installed: pip install 'atss-jax[k8s]' (or set JAX_COORDINATOR_ADDRESS and "
            "JAX_NUM_PROCESSES in the pod spec).")
    # A pod is scheduled onto one node with the GPUs it requested: it drives all of them.
    return dataclasses.replace(job, local_rank=0, processes_on_node=1)


def detect_job(environ: Mapping[str, str] | None = None, *, kubernetes_installed: bool | None = None) -> Job | None:
    """The multi-process job the environment describes, or None where the launcher started one process.

    Raises ClusterError where the environment describes a job this process cannot join (a variable missing).
    """
    environ = os.environ if environ is None else environ
    if kubernetes_installed is None:
        kubernetes_installed = importlib.util.find_spec("kubernetes") is not None
    if "SLURM_JOB_ID" in environ:
        return _slurm_job(environ)
    if "OMPI_COMM_WORLD_SIZE" in environ:
        return _openmpi_job(environ)
    if "KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ:
        return _kubernetes_job(environ, kubernetes_installed)
    if "JAX_COORDINATOR_ADDRESS" in environ:
        return _coordinator_from_environment(environ, "coordinator")
    return None


def _visible_gpus(environ: Mapping[str, str]) -> int | None:
    """GPUs this process may see before any choice: CUDA_VISIBLE_DEVICES, else SLURM's count on this node."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        return len([d for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
    return _optional_int(environ, "SLURM_GPUS_ON_NODE")


def local_device_ids(job: Job, environ: Mapping[str, str] | None = None) -> list[int] | None:
    """The GPUs (indices among those visible) this process drives; None: every visible one.

    JAX_LOCAL_DEVICE_IDS, where set, decides. Otherwise: one process on the node, or a launcher that bound
    one GPU to this process, -> every visible GPU; k processes on the node and a multiple of k GPUs ->
    block ``local_rank`` of k; k processes and an unknown GPU count -> GPU ``local_rank`` (one per GPU).
    """
    environ = os.environ if environ is None else environ
    if "JAX_LOCAL_DEVICE_IDS" in environ:
        return [int(i) for i in environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
    gpus, per_node = _visible_gpus(environ), job.processes_on_node
    if job.local_rank is None or per_node == 1 or gpus == 1:
        return None
    if gpus is None or per_node is None:
        return [job.local_rank]
    if gpus % per_node:
        raise ClusterError(f"{per_node} processes on this node share {gpus} GPUs, which do not split evenly: run "
                           "one process per GPU or one per node, or set JAX_LOCAL_DEVICE_IDS for each process.")
    share = gpus // per_node
    return list(range(job.local_rank * share, (job.local_rank + 1) * share))


def join(mode: str, coordinator_address: str | None = None, num_processes: int | None = None,
         process_id: int | None = None, environ: Mapping[str, str] | None = None) -> Job | None:
    """Connects this process to its job (``jax.distributed.initialize``); returns the job, None if alone.

    Must run before anything touches a JAX backend. ``mode``:
      "auto": join the job the environment describes (``detect_job``); elsewhere JAX's own detection, which
        finds a Cloud TPU VM's slice through its metadata server; a plain machine stays a single process.
      "on": the same, where finding no job is an error.
      "off": a single process whatever the environment.
      "launcher": join only a job a launcher started (``detect_job`` or the flags), never a TPU slice by
        itself: evaluation on one worker of a pod, or on a VM beside the training job.
    The explicit arguments are for clusters none of these describe (all three together).
    """
    if mode not in ("auto", "on", "off", "launcher"):
        raise ValueError(f"distributed mode {mode!r}: use 'auto', 'on', 'off' or 'launcher'.")
    if mode == "off":
        return None
    environ = os.environ if environ is None else environ
    flags = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
             "--process_id": process_id}
    if any(value is not None for value in flags.values()):
        missing = [name for name, value in flags.items() if value is None]
        if missing:
            raise ClusterError(f"{', '.join(flags)} go together: {', '.join(missing)} missing.")
        job = Job("coordinator", coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
    else:
        job = detect_job(environ)
    if job is None and mode == "launcher":
        return None
    devices = None if job is None else local_device_ids(job, environ)
    try:
        if job is None:
            jax.distributed.initialize()
        else:
            # An empty list keeps every visible device: None would let JAX restrict the process to GPU
            # <local rank>, whatever the layout.
            jax.distributed.initialize(
                job.coordinator_address, job.num_processes, job.process_id, local_device_ids=devices or [],
                cluster_detection_method=job.jax_detection or "deactivate")
    except ValueError as error:
        if job is None and "coordinator_address should be defined" in str(error):
            if mode == "on":
                raise ClusterError(
                    "--distributed=on but no job was found: start the processes with srun, mpirun, an indexed "
                    "Kubernetes Job or on a Cloud TPU VM slice, export JAX_COORDINATOR_ADDRESS, "
                    "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or pass --coordinator_address, --num_processes and "
                    "--process_id.") from None
            logging.info("No multi-process job found (SLURM, Open MPI, Kubernetes, TPU slice, "
                         "JAX_COORDINATOR_ADDRESS): one process.")
            return None
        raise ClusterError(f"jax.distributed.initialize() failed: {error}") from None
    job = job or Job("cloud-tpu")
    logging.info("Joined a %d-process job as process %d (%s); GPUs driven: %s.", jax.process_count(),
                 jax.process_index(), job.launcher, "every visible one" if devices is None else devices)
    return job
