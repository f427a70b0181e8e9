"""The cluster launchers (scripts/launch/): the commands their dry runs print, and the SLURM batch job's
requeue after a preemption, run with stand-ins for srun and scontrol."""

import os
import shlex
import subprocess

import pytest

from tests.support import hangs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = os.path.join(ROOT, "scripts", "launch", "slurm_train.sh")
TPU_POD = os.path.join(ROOT, "scripts", "launch", "tpu_pod.sh")


def _bash(script, *args, **env):
    return subprocess.run(["bash", script, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=hangs.SUBPROCESS_S, env={**os.environ, **env})


def _options(words):
    """{--name: value} of the words before the program's own arguments."""
    return dict(word.split("=", 1) for word in words if word.startswith("--") and "=" in word)


def test_slurm_one_process_per_node_by_default():
    result = _bash(SLURM, "--dry_run", "gpu", "atss", "configs/atss_r50_fpn_1x_coco.py", "/ckpt/atss",
                   "--config.data.data_dir=/data/tfds", GPUS="16")
    assert result.returncode == 0, result.stderr
    words = shlex.split(result.stdout)
    split = words.index("-m")
    assert words[0] == "srun" and words[split - 2:split] == ["python", "-u"]
    options = _options(words[:split])
    assert options == {"--partition": "gpu", "--job-name": "atss", "--nodes": "2", "--ntasks-per-node": "1",
                       "--gres": "gpu:8", "--cpus-per-task": "64", "--kill-on-bad-exit": "1"}
    assert words[split + 1:] == ["atss_jax.main", "--config=configs/atss_r50_fpn_1x_coco.py", "--workdir=/ckpt/atss",
                                 "--distributed=on", "--config.data.data_dir=/data/tfds"]


def test_slurm_one_process_per_gpu():
    result = _bash(SLURM, "--dry_run", "gpu", "atss", "c.py", "/w", GPUS="4", LAYOUT="gpu", CPUS_PER_GPU="6",
                   SRUN_ARGS="--time=1:00:00 --exclusive")
    words = shlex.split(result.stdout)
    options = _options(words[:words.index("-m")])
    assert (options["--nodes"], options["--ntasks-per-node"], options["--gres"], options["--cpus-per-task"]) == (
        "1", "4", "gpu:4", "6")
    assert options["--time"] == "1:00:00" and "--exclusive" in words


@pytest.mark.parametrize("env, message", [
    ({"GPUS": "12", "GPUS_PER_NODE": "8"}, "GPUS=12 is not a multiple of GPUS_PER_NODE=8"),
    ({"LAYOUT": "rack"}, "LAYOUT=rack"),
])
def test_slurm_refuses_a_layout_it_cannot_make(env, message):
    result = _bash(SLURM, "--dry_run", "gpu", "atss", "c.py", "/w", **env)
    assert result.returncode == 2 and message in result.stderr


def test_the_slurm_batch_job_requeues_itself_after_a_preemption_only(tmp_path):
    result = _bash(SLURM, "--sbatch", "--dry_run", "gpu", "atss", "c.py", "/w", GPUS="8")
    words = shlex.split(result.stdout)
    assert words[0] == "sbatch" and "--requeue" in words
    options = _options(words)
    assert options["--signal"] == "TERM@300" and options["--output"] == "slurm_logs/atss-%j.out"
    batch = options["--wrap"]
    assert shlex.split(batch)[0] == "srun"
    # The batch script, run with stand-ins for srun (exiting with $SRUN_EXIT) and scontrol (recording its call).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit $SRUN_EXIT\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "777"}
    for srun_exit in (0, 1, 143):
        status = subprocess.run(["bash", "-c", batch], env={**env, "SRUN_EXIT": str(srun_exit)},
                                timeout=hangs.SUBPROCESS_S).returncode
        assert status == srun_exit
    assert (tmp_path / "scontrol.log").read_text() == "requeue 777\n"


TPU = {"TPU_NAME": "atss", "ZONE": "us-central2-b", "ACCELERATOR": "v4-32"}


def _tpu_commands(home, *args, **env):
    result = _bash(TPU_POD, "--dry_run", *args, HOME=str(home), **TPU, **env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if not line.startswith("#")]


def test_tpu_pod_create_install_train(tmp_path):
    [create] = _tpu_commands(tmp_path, "create", SPOT="1")
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert _options(create) == {"--node-id": "atss", "--zone": "us-central2-b", "--accelerator-type": "v4-32",
                                "--runtime-version": "tpu-ubuntu2204-base"}
    assert "--spot" in create
    archive, copy, setup = _tpu_commands(tmp_path, "install")
    assert archive[:3] == ["git", "archive", "--format=tar.gz"] and copy[3:5] == ["tpu-vm", "scp"]
    assert _options(setup)["--worker"] == "all" and "bash scripts/setup.sh tpu" in _options(setup)["--command"]
    [train] = _tpu_commands(tmp_path, "train", "configs/atss_r50_fpn_1x_coco_tpu_pod.py", "gs://b/run",
                            "--config.data.data_dir=gs://b/tfds")
    remote = _options(train)["--command"]
    assert _options(train)["--worker"] == "all" and "nohup .venv/bin/python -m atss_jax.main" in remote
    assert ("--config=configs/atss_r50_fpn_1x_coco_tpu_pod.py --workdir=gs://b/run --distributed=on "
            "--config.data.data_dir=gs://b/tfds") in remote


def test_tpu_pod_relaunch_repeats_the_recorded_training(tmp_path):
    recorded = tmp_path / ".atss_tpu_pod" / "atss.cmd"
    recorded.parent.mkdir()
    recorded.write_text(".venv/bin/python -m atss_jax.main --config=c.py --workdir=gs://b/run --distributed=on\n")
    commands = _tpu_commands(tmp_path, "relaunch")
    # delete, create, then install (archive, copy, set up) and start, as the single commands do.
    assert [c[:5] for c in commands[:2]] == [["gcloud", "compute", "tpus", "queued-resources", verb]
                                             for verb in ("delete", "create")]
    assert commands[2:5] == _tpu_commands(tmp_path, "install")
    start = commands[5]
    assert "nohup .venv/bin/python -m atss_jax.main --config=c.py --workdir=gs://b/run --distributed=on" in (
        _options(start)["--command"])


def test_tpu_pod_logs_kill_delete_and_a_missing_setting(tmp_path):
    [logs] = _tpu_commands(tmp_path, "logs", "2")
    assert _options(logs)["--worker"] == "2" and "tail" in _options(logs)["--command"]
    [kill] = _tpu_commands(tmp_path, "kill")
    assert _options(kill)["--worker"] == "all" and "pkill -TERM -f '[a]tss_jax.main'" in _options(kill)["--command"]
    [delete] = _tpu_commands(tmp_path, "delete")
    assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete
    result = _bash(TPU_POD, "--dry_run", "create", HOME=str(tmp_path), TPU_NAME="", ZONE="z")
    assert result.returncode == 2 and "set TPU_NAME" in result.stderr
    result = _bash(TPU_POD, "--dry_run", "relaunch", HOME=str(tmp_path), **TPU)
    assert result.returncode == 2 and "no train command recorded" in result.stderr
