"""Which job a launcher's environment describes, which GPUs each process drives, and the one-line refusals
(atss_jax.cluster); tests/test_cluster_launch.py starts the processes for real."""

import pytest

from atss_jax import cluster


def _slurm(tasks: int, tasks_per_node: str, proc: int, local: int, node: int, **extra: str) -> dict[str, str]:
    """What srun exports to one task of a step."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": str(tasks),
            "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_PROCID": str(proc), "SLURM_LOCALID": str(local),
            "SLURM_NODEID": str(node), **extra}


EIGHT_GPUS = "0,1,2,3,4,5,6,7"


@pytest.mark.parametrize("environ, expected", [
    # srun --nodes=2 --ntasks-per-node=8: task 11 is local rank 3 of 8 on the second node.
    (_slurm(16, "8(x2)", 11, 3, 1, CUDA_VISIBLE_DEVICES=EIGHT_GPUS), [3]),
    # srun --nodes=2 --ntasks-per-node=1: one process drives its node's eight GPUs.
    (_slurm(2, "1(x2)", 1, 0, 1, CUDA_VISIBLE_DEVICES=EIGHT_GPUS), None),
    # srun --ntasks-per-node=2 on 8-GPU nodes: local rank 1 drives the second half.
    (_slurm(4, "2(x2)", 3, 1, 1, CUDA_VISIBLE_DEVICES=EIGHT_GPUS), [4, 5, 6, 7]),
    # srun --gpus-per-task=1: SLURM already bound one GPU to each task; it is the one it sees.
    (_slurm(16, "8(x2)", 11, 3, 1, CUDA_VISIBLE_DEVICES="3"), None),
    # No CUDA_VISIBLE_DEVICES: SLURM's per-node GPU count decides.
    (_slurm(4, "2(x2)", 2, 0, 1, SLURM_GPUS_ON_NODE="8"), [0, 1, 2, 3]),
    # Uneven steps ("2(x3),1"): the fourth node runs one task.
    (_slurm(7, "2(x3),1", 6, 0, 3, CUDA_VISIBLE_DEVICES=EIGHT_GPUS), None),
    # JAX_LOCAL_DEVICE_IDS is the user's own choice.
    (_slurm(2, "1(x2)", 0, 0, 0, CUDA_VISIBLE_DEVICES=EIGHT_GPUS, JAX_LOCAL_DEVICE_IDS="0,2"), [0, 2]),
])
def test_slurm_layouts(environ, expected):
    job = cluster.detect_job(environ)
    assert (job.launcher, job.jax_detection) == ("slurm", "slurm")
    assert (job.num_processes, job.process_id) == (int(environ["SLURM_NTASKS"]), int(environ["SLURM_PROCID"]))
    assert cluster.local_device_ids(job, environ) == expected


def test_gpus_that_do_not_split_over_the_node_processes_are_refused():
    environ = _slurm(6, "3(x2)", 1, 1, 0, CUDA_VISIBLE_DEVICES=EIGHT_GPUS)
    with pytest.raises(cluster.ClusterError, match="3 processes on this node share 8 GPUs"):
        cluster.local_device_ids(cluster.detect_job(environ), environ)


def test_a_slurm_batch_shell_outside_srun_is_refused_naming_srun():
    environ = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_NODELIST": "gpu[001-002]"}
    with pytest.raises(cluster.ClusterError) as error:
        cluster.detect_job(environ)
    message = str(error.value)
    assert "srun" in message and "SLURM_PROCID" in message and "SLURM_STEP_NODELIST" in message
    assert "\n" not in message


def test_single_task_allocations_run_alone_on_every_gpu():
    assert cluster.detect_job({"SLURM_JOB_ID": "1", "SLURM_NODELIST": "gpu001"}) is None  # salloc shell
    assert cluster.detect_job(_slurm(1, "1", 0, 0, 0)) is None  # srun -n1: JAX would restrict it to GPU 0
    assert cluster.detect_job({"OMPI_COMM_WORLD_SIZE": "1"}) is None


def _openmpi(size: int, rank: int, local_size: int, **extra: str) -> dict[str, str]:
    return {"OMPI_COMM_WORLD_SIZE": str(size), "OMPI_COMM_WORLD_RANK": str(rank),
            "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % local_size),
            "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size), **extra}


def test_open_mpi_4_is_read_by_jax_and_open_mpi_5_needs_the_coordinator():
    uri = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.0.0.1:34911"}
    job = cluster.detect_job(_openmpi(16, 9, 8, **uri))
    assert (job.launcher, job.jax_detection, job.num_processes, job.process_id) == ("openmpi", "ompi", 16, 9)
    assert cluster.local_device_ids(job, {"CUDA_VISIBLE_DEVICES": EIGHT_GPUS}) == [1]
    per_node = cluster.detect_job(_openmpi(2, 1, 1, **uri))
    assert cluster.local_device_ids(per_node, {"CUDA_VISIBLE_DEVICES": EIGHT_GPUS}) is None

    with pytest.raises(cluster.ClusterError, match="-x JAX_COORDINATOR_ADDRESS="):
        cluster.detect_job(_openmpi(16, 9, 8))
    job = cluster.detect_job(_openmpi(16, 9, 8, JAX_COORDINATOR_ADDRESS="gpu001:6000"))
    assert (job.jax_detection, job.coordinator_address, job.num_processes, job.process_id) == (
        None, "gpu001:6000", 16, 9)


def test_an_indexed_kubernetes_job_needs_the_k8s_extra_or_the_coordinator_in_its_spec():
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}
    with pytest.raises(cluster.ClusterError, match=r"atss-jax\[k8s\]"):
        cluster.detect_job(pod, kubernetes_installed=False)
    job = cluster.detect_job(pod, kubernetes_installed=True)
    assert (job.jax_detection, job.process_id) == ("k8s", 3)
    assert cluster.local_device_ids(job, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}) is None
    spec = {**pod, "JAX_COORDINATOR_ADDRESS": "train-0.train:6000", "JAX_NUM_PROCESSES": "4"}
    job = cluster.detect_job(spec, kubernetes_installed=False)
    assert (job.jax_detection, job.coordinator_address, job.num_processes, job.process_id) == (
        None, "train-0.train:6000", 4, 3)
    # A pod outside an indexed Job (a Deployment, a notebook) is a machine like any other.
    assert cluster.detect_job({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, kubernetes_installed=False) is None


@pytest.mark.parametrize("environ, missing", [
    ({"JAX_COORDINATOR_ADDRESS": "host0:6000"}, "JAX_NUM_PROCESSES"),
    ({"JAX_COORDINATOR_ADDRESS": "host0:6000", "JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID"),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "a", "SLURM_NTASKS": "x2", "SLURM_PROCID": "0",
      "SLURM_LOCALID": "0"}, "SLURM_NTASKS='x2'"),
])
def test_a_partial_environment_names_the_missing_variable(environ, missing):
    with pytest.raises(cluster.ClusterError, match=missing):
        cluster.detect_job(environ)


def test_coordinator_flags_go_together():
    with pytest.raises(cluster.ClusterError, match="--num_processes, --process_id missing"):
        cluster.join("auto", coordinator_address="host0:6000", environ={})


def test_the_environment_read_here_is_what_jax_reads(monkeypatch):
    """The simulated launchers' variables make JAX's own cluster detection find the same job."""
    from jax._src import clusters

    for environ, name in [(_slurm(16, "8(x2)", 11, 3, 1), "slurm"),
                          (_openmpi(16, 9, 8, OMPI_MCA_orte_hnp_uri="1.0;tcp://10.0.0.1:3"), "ompi")]:
        monkeypatch.setattr("os.environ", environ)
        [jax_cluster] = [c for c in clusters.ClusterEnv._cluster_types if c.name == name]
        assert jax_cluster.is_env_present()
        job = cluster.detect_job(environ)
        assert (jax_cluster.get_process_count(), jax_cluster.get_process_id(),
                jax_cluster.get_local_process_id()) == (job.num_processes, job.process_id, job.local_rank)
