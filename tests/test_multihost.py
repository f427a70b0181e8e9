"""A simulated multi-host job: 2 processes x 4 CPU devices on localhost through jax.distributed train the
tiny config with per-host data shards, checkpoint, restore and evaluate with the multi-host merge; the
results equal a 1-process x 8-device run.

Training reaches `jax.distributed.initialize()` as on a cluster: the command line names no coordinator
and JAX's own detection reads the job from the environment (SLURM's variables here; a Cloud TPU VM's
come from its metadata server). Evaluation passes the coordinator explicitly instead.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.support import hangs
from tests.test_train import ROOT, _config, _run_training, assert_same_training

pytestmark = pytest.mark.e2e  # README "Tests": the slow tier


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _slurm_environment(process_id: int, port: int) -> dict[str, str]:
    """What SLURM exports to task `process_id` of a 2-task job on one node (JAX_COORDINATOR_PORT: a free
    port, instead of the one JAX derives from the job id)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2",
            "SLURM_PROCID": str(process_id), "SLURM_LOCALID": str(process_id), "JAX_COORDINATOR_PORT": str(port)}


def _run_two_hosts(workdir, data_dir, *flags, detected=True):
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    commands = []
    for i in range(2):
        base = [sys.executable, "-m", "atss_jax.main", "--config=configs/demo.py:tiny", f"--workdir={workdir}",
                f"--config.data.data_dir={data_dir}", *flags]
        if detected:
            commands.append((base, {**env, **_slurm_environment(i, port)}))
        else:
            commands.append(([*base, f"--coordinator_address=localhost:{port}", "--num_processes=2",
                              f"--process_id={i}"], env))
    processes = [subprocess.Popen(command, cwd=ROOT, env=process_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for command, process_env in commands]
    outputs = [p.communicate(timeout=hangs.SUBPROCESS_S) for p in processes]
    for p, (_, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr[-3000:]
    for i, (_, stderr) in enumerate(outputs):
        assert f"process {i} of 2" in stderr  # the start-up line: both processes joined one job
    return outputs


@pytest.fixture(scope="module")
def runs(tiny_trainings, tmp_path_factory):
    """The shared 1-process x 8-device training (copied: evaluation writes into it) and the 2-host one."""
    data_dir, trainings = tiny_trainings
    single = str(tmp_path_factory.mktemp("one_host") / "workdir")
    shutil.copytree(trainings[8], single)
    multi = str(tmp_path_factory.mktemp("two_hosts"))
    _run_two_hosts(multi, data_dir)
    return data_dir, single, multi


def test_two_hosts_train_like_one(runs):
    data_dir, single, multi = runs
    assert_same_training([single, multi], _config(data_dir))


def test_two_hosts_restore_and_evaluate_with_the_merge(runs):
    _, single, multi = runs
    outputs = _run_two_hosts(multi, runs[0], "--mode=eval", "--config.eval.score_threshold=0.0", detected=False)
    assert "COCO box metrics" in outputs[0][0] and "COCO box metrics" not in outputs[1][0]
    merged = []
    for host in range(2):
        with open(os.path.join(multi, "eval", "step_3", f"detections_host{host}.json")) as f:
            part = json.load(f)
        assert part, f"host {host} evaluated no image"
        merged += part
    _run_training(single, runs[0], 8, "--mode=eval", "--config.eval.score_threshold=0.0")
    with open(os.path.join(single, "eval", "step_3", "detections_host0.json")) as f:
        reference = json.load(f)
    assert len(merged) == len(reference)
    # Equal scores can come out of NMS in either order, so match each detection to its nearest.
    groups = {}
    for d in reference:
        groups.setdefault((d["image_id"], d["category_id"]), []).append(d["bbox"] + [d["score"]])
    for d in merged:
        candidates = np.array(groups[(d["image_id"], d["category_id"])])
        distance = np.abs(candidates - np.array(d["bbox"] + [d["score"]])).max(axis=1)
        assert distance.min() < 1e-2, d
    with open(os.path.join(multi, "metrics.json")) as f, open(os.path.join(single, "metrics.json")) as g:
        assert json.load(f)["metrics"] == pytest.approx(json.load(g)["metrics"], abs=1e-6)
