"""Fixtures shared by several test modules."""

import os

import jax
import ml_collections
import pytest

from atss_jax import xla_flags
from atss_jax.data import datasets
from configs import demo
from tests.support import accelerator_check, cpu_flags, launch


def pytest_configure(config: pytest.Config) -> None:
    """XLA:CPU's test flags (tests/support/cpu_flags.py), then a persistent XLA compilation cache in
    pytest's cache folder (.pytest_cache/d/xla_compilation_cache), shared by the xdist workers and by the
    subprocesses they start: trainings of the same program in and out of this process compile once per run, and
    a rerun reuses the programs whose code did not change (its key is the program, the flags and the jax
    version, so a stale entry is never used; `--cache-clear` empties it). Without pytest's cache
    (`-p no:cacheprovider`) every program compiles afresh."""
    assert not xla_flags.backend_started(), "JAX started before the test flags were set"
    os.environ["XLA_FLAGS"] = cpu_flags.with_test_flags(os.environ.get("XLA_FLAGS", ""))
    if not hasattr(config, "cache"):
        return
    directory = str(config.cache.mkdir("xla_compilation_cache"))
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


# Session set-ups too costly to repeat on every xdist worker: the tests that use one run on the same worker.
SHARED_SETUPS = ("tiny_trainings", "accelerator_smoke")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups the tests for `--dist loadgroup`: those of one expensive session set-up (``SHARED_SETUPS``)
    together, the others by module (so a module's own set-ups run once); groups with end-to-end tests first,
    so that the long ones start early and the short ones fill in around them."""
    groups = {}
    for item in items:
        group = next((name for name in SHARED_SETUPS if name in item.fixturenames), item.module.__name__)
        if config.pluginmanager.hasplugin("xdist"):
            item.add_marker(pytest.mark.xdist_group(group))
        groups.setdefault(group, []).append(item)
    slow = {group for group, members in groups.items() if any(m.get_closest_marker("e2e") for m in members)}
    items[:] = [item for group, members in groups.items() if group in slow for item in members] + [
        item for group, members in groups.items() if group not in slow for item in members]


@pytest.fixture(scope="session")
def synthetic_data_config(tmp_path_factory) -> ml_collections.ConfigDict:
    """config.data of the tiny config (a small synthetic dataset), prepared once per test session."""
    config = demo.get_config("tiny")
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    datasets.prepare(config.data)
    return config.data


@pytest.fixture(scope="session")
def tiny_trainings(synthetic_data_config, tmp_path_factory) -> tuple[str, dict[int, str]]:
    """(data_dir, {devices: workdir}): the tiny config trained for 3 steps on 1 device in a fresh process, and on
    8 devices as a simulated 2-host job (2 processes x 4 CPU devices started with SLURM's variables, one task per
    node) with the same global batch; shared by the trainer, multi-host, launcher and reliability tests, which
    must not write into these workdirs."""
    from tests.test_train import _run_training

    data_dir = synthetic_data_config.data_dir
    single = str(tmp_path_factory.mktemp("train_1"))
    result = _run_training(single, data_dir, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    two_hosts = str(tmp_path_factory.mktemp("train_8_on_2_hosts"))
    launch.run_two_hosts(two_hosts, data_dir)
    return data_dir, {1: single, 8: two_hosts}


@pytest.fixture(scope="session")
def accelerator_smoke(tmp_path_factory) -> accelerator_check.Check:
    """``accelerator_check.sh --smoke`` run once, the first bfloat16 attempt out of memory (simulated): the tests
    of the script and of the benchmarks it runs (benchmark_train, benchmark_peer with --profile) read it."""
    return accelerator_check.run(str(tmp_path_factory.mktemp("accelerator_smoke")), "--smoke",
                                 "--simulate_oom=bfloat16")
