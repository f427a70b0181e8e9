"""Fixtures shared by several test modules."""

import os

import jax
import ml_collections
import pytest

from atss_jax.data import datasets
from configs import demo


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for the session: trainings of the same config in and out of this process
    compile once."""
    directory = str(tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1.0"


@pytest.fixture(scope="session")
def synthetic_data_config(tmp_path_factory) -> ml_collections.ConfigDict:
    """config.data of the tiny config (a small synthetic dataset), prepared once per test session."""
    config = demo.get_config("tiny")
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    datasets.prepare(config.data)
    return config.data


@pytest.fixture(scope="session")
def tiny_trainings(synthetic_data_config, tmp_path_factory) -> tuple[str, dict[int, str]]:
    """(data_dir, {devices: workdir}): the tiny config trained for 3 steps in a fresh process on 1 device and on
    8 simulated devices (same global batch); shared by the trainer and multi-host tests, which must not write
    into these workdirs."""
    from tests.test_train import _run_training

    data_dir = synthetic_data_config.data_dir
    workdirs = {}
    for devices in (1, 8):
        workdir = str(tmp_path_factory.mktemp(f"train_{devices}"))
        result = _run_training(workdir, data_dir, devices)
        assert result.returncode == 0, result.stderr[-3000:]
        workdirs[devices] = workdir
    return data_dir, workdirs
