"""Several trainer processes on localhost, started the way a cluster launcher starts them."""

import os
import socket
import subprocess
import sys

from tests.support import cpu_flags, hangs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Variables through which this machine's own environment could describe a job: removed from every process.
JOB_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "JAX_LOCAL_DEVICE_IDS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "OMPI_MCA_orte_hnp_uri",
                 "PMIX_SERVER_URI2", "TPU_WORKER_HOSTNAMES", "KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def clean_environment(devices: int) -> dict[str, str]:
    """This machine's environment without job variables, with `devices` simulated CPU devices."""
    return {**{k: v for k, v in os.environ.items() if k not in JOB_VARIABLES},
            "XLA_FLAGS": cpu_flags.with_devices(devices)}


def run_processes(arguments: list[list[str]], environments: list[dict[str, str]]) -> list[tuple[str, str]]:
    """Runs ``python <arguments[i]>`` with ``environments[i]`` for every i at once; (stdout, stderr) of each,
    after checking that all of them succeeded."""
    processes = [subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for args, env in zip(arguments, environments)]
    outputs = [p.communicate(timeout=hangs.SUBPROCESS_S) for p in processes]
    for p, (_, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr[-3000:]
    return outputs


def tiny_training_command(workdir: str, data_dir: str, *flags: str) -> list[str]:
    """The tiny config's trainer command line (arguments of ``python``)."""
    return ["-m", "atss_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *flags]


def slurm_one_task_per_node(node: int, port: int) -> dict[str, str]:
    """What srun exports to the task on node `node` of a 2-node job with one task per node (both nodes are this
    machine; JAX_COORDINATOR_PORT: a free port, instead of the one JAX derives from the job id)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost,localhost", "SLURM_NTASKS": "2",
            "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": str(node), "SLURM_PROCID": str(node),
            "SLURM_LOCALID": "0", "CUDA_VISIBLE_DEVICES": "0,1,2,3", "JAX_COORDINATOR_PORT": str(port)}


def run_two_hosts(workdir: str, data_dir: str, *flags: str, detected: bool = True) -> list[tuple[str, str]]:
    """The tiny config's trainer as 2 processes x 4 CPU devices: started by SLURM (``detected``; one task per
    node, each driving its node's devices) or with the coordinator flags. Checks that both joined one job."""
    port = free_port()
    command = tiny_training_command(workdir, data_dir, *flags)
    if detected:
        arguments = [command] * 2
        environments = [{**clean_environment(4), **slurm_one_task_per_node(node, port)} for node in range(2)]
    else:
        arguments = [[*command, f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"]
                     for i in range(2)]
        environments = [clean_environment(4)] * 2
    outputs = run_processes(arguments, environments)
    for i, (_, stderr) in enumerate(outputs):
        assert f"process {i} of 2" in stderr, stderr[-3000:]  # the start-up line: both joined one job
        if detected:
            assert f"Joined a 2-process job as process {i} (slurm); GPUs driven: every visible one." in stderr
    return outputs
