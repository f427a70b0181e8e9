"""The entry point's start-up: no silent CPU training, joining a job or refusing in one line, the start-up line."""

import os
import subprocess
import sys

import pytest

from tests.support import hangs, launch

pytestmark = pytest.mark.e2e  # README "Tests": the slow tier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(args, **env):
    clean = {k: v for k, v in os.environ.items() if k not in launch.JOB_VARIABLES}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=hangs.SUBPROCESS_S, env={**clean, **env})


def test_coco_config_on_cpu_stops_before_any_work_and_says_why(tmp_path):
    missing = tmp_path / "no_data_here"
    result = _python(["-m", "atss_jax.main", "--config=configs/atss_r50_fpn_1x_coco.py", f"--workdir={tmp_path / 'w'}",
                      f"--config.data.data_dir={missing}"])
    assert result.returncode != 0
    # The reason is the CPU, not the (missing) dataset: the check comes before any data or model is touched.
    assert "needs an accelerator" in result.stderr and "--allow_cpu" in result.stderr
    assert "JAX backend cpu" in result.stderr and "process 0 of 1" in result.stderr
    assert not (tmp_path / "w").exists()


def test_allow_cpu_lets_a_coco_config_start(tmp_path):
    # With --allow_cpu the same command gets past the check and stops at the next problem: the dataset.
    result = _python(["-m", "atss_jax.main", "--config=configs/atss_r50_fpn_1x_coco.py", f"--workdir={tmp_path / 'w'}",
                      f"--config.data.data_dir={tmp_path / 'no_data_here'}", "--allow_cpu"])
    assert result.returncode != 0
    assert "needs an accelerator" not in result.stderr and "not prepared" in result.stderr


def test_without_a_cluster_auto_stays_one_process():
    script = """
import jax
from atss_jax import cluster, parallel
assert cluster.join("auto") is None and cluster.join("off") is None
assert not jax.distributed.is_initialized()
print(parallel.describe_devices())
"""
    result = _python(["-c", script])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "JAX backend cpu: 1 local x cpu, 1 devices in all; process 0 of 1" in result.stdout


@pytest.mark.parametrize("flags, environment, message", [
    (["--distributed=on"], {}, "atss_jax.main: --distributed=on but no job was found"),
    ([], {"JAX_COORDINATOR_ADDRESS": "localhost:1234"}, "atss_jax.main: JAX_COORDINATOR_ADDRESS is set but "
                                                          "JAX_NUM_PROCESSES is not"),
])
def test_a_launch_that_cannot_work_is_one_line_without_traceback(tmp_path, flags, environment, message):
    result = _python(["-m", "atss_jax.main", "--config=configs/demo.py:tiny", f"--workdir={tmp_path / 'w'}", *flags],
                     **environment)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()


def test_a_new_run_without_config_names_what_is_missing(tmp_path):
    result = _python(["-m", "atss_jax.main", f"--workdir={tmp_path}"])
    assert result.returncode != 0
    assert "config.json is missing" in result.stderr and "--config=" in result.stderr


@pytest.mark.parametrize("argv, added", [
    (["main", "--workdir=gs://b/run", "--mode=eval", "--config.data.data_dir=/x"], True),
    (["main", "--workdir", "/w", "--config.eval.score_threshold=0.5"], True),
    (["main", "--workdir=/w", "--config=configs/demo.py", "--config.train.num_steps=2"], False),
    (["main", "--workdir=/w", "--mode=eval"], False),
])
def test_overrides_on_a_workdir_read_its_config(argv, added):
    from atss_jax import workdir_config

    rewritten = workdir_config.with_workdir_config(argv)
    if not added:
        assert rewritten == argv
        return
    workdir = "gs://b/run" if "--workdir=gs://b/run" in argv else "/w"
    assert rewritten[1].startswith("--config=") and rewritten[1].endswith(f"workdir_config.py:{workdir}")
    assert rewritten[:1] + rewritten[2:] == argv
