"""Each launcher's layout, simulated on localhost: 2 processes x 1 CPU device started with the variables
srun, mpirun or an indexed Kubernetes Job give them (no coordinator on the command line) connect, drive the
devices their layout gives them, and take the first step of the shared 1-device training. The one-process-
per-node SLURM layout is the shared 2-host training (``tiny_trainings``); the layout rules themselves are
tests/test_cluster.py's."""

import json

import pytest

from tests.support import launch
from tests.test_train import _config, assert_same_training

pytestmark = pytest.mark.e2e  # README "Tests": the slow tier


def _srun_one_task_per_gpu(rank: int, port: int) -> dict[str, str]:
    """srun --ntasks-per-node=2 on a 2-GPU node."""
    return {"SLURM_JOB_ID": "4243", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
            "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NODEID": "0", "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "CUDA_VISIBLE_DEVICES": "0,1", "JAX_COORDINATOR_PORT": str(port)}


def _mpirun_open_mpi_4(rank: int, port: int) -> dict[str, str]:
    """mpirun -np 2 (Open MPI 4: JAX finds the launcher's address in OMPI_MCA_orte_hnp_uri)."""
    return {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://127.0.0.1:34911", "OMPI_COMM_WORLD_SIZE": "2",
            "OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_LOCAL_RANK": str(rank),
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0,1", "JAX_COORDINATOR_PORT": str(port)}


def _indexed_kubernetes_job(rank: int, port: int) -> dict[str, str]:
    """A 2-pod indexed Job whose spec names the coordinator (README "Kubernetes")."""
    return {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "JOB_COMPLETION_INDEX": str(rank),
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2"}


@pytest.mark.parametrize("environment, launcher, devices", [
    (_srun_one_task_per_gpu, "slurm", ["[0]", "[1]"]),
    (_mpirun_open_mpi_4, "openmpi", ["[0]", "[1]"]),
    (_indexed_kubernetes_job, "kubernetes", ["every visible one"] * 2),
])
def test_launcher_layout_takes_the_first_step_of_one_process(tiny_trainings, tmp_path, environment, launcher, devices):
    data_dir, trainings = tiny_trainings
    port = launch.free_port()
    command = launch.tiny_training_command(str(tmp_path), data_dir, "--distributed=on", "--config.train.num_steps=1",
                                           "--config.train.eval_every=-1")
    outputs = launch.run_processes([command] * 2, [{**launch.clean_environment(1), **environment(rank, port)}
                                                   for rank in range(2)])
    for rank, (_, stderr) in enumerate(outputs):
        assert f"Joined a 2-process job as process {rank} ({launcher}); GPUs driven: {devices[rank]}." in stderr
        assert f"2 devices in all; process {rank} of 2" in stderr
    # config.train.eval_every=-1: trained and saved, never evaluated (that is --mode=eval's job).
    assert json.loads((tmp_path / "finished.json").read_text()) == {"step": 1, "metrics": None}
    assert not (tmp_path / "eval").exists()
    config = _config(data_dir)
    config.train.num_steps = 1
    assert_same_training([trainings[1], str(tmp_path)], config)
