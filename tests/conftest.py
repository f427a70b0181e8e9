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
