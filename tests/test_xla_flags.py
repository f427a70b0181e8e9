"""atss_jax.xla_flags: which convolution library XLA:CPU is given, and that a user's own choice is kept."""

import os
import subprocess
import sys

import pytest

from atss_jax import xla_flags


def test_adds_eigen_convolutions_and_keeps_other_flags():
    flags = xla_flags.with_eigen_convolutions("--xla_force_host_platform_device_count=8")
    assert flags.split() == ["--xla_force_host_platform_device_count=8", xla_flags.EIGEN_CONVOLUTIONS]
    assert not xla_flags.ynn_convolutions(flags)


def test_a_users_own_setting_is_kept():
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution"
    assert xla_flags.with_eigen_convolutions(mine) == mine


@pytest.mark.parametrize("flags, ynn", [
    ("", True),  # jaxlib's default
    ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", False),
    ("--xla_cpu_experimental_ynn_fusion_type=-individual_dot", True),
    ("--xla_cpu_experimental_ynn_fusion_type=individual_dot", False),
    ("--xla_cpu_experimental_ynn_fusion_type=", False),
    ("--xla_cpu_experimental_ynn_fusion_type=individual_convolution", True),
    # the last setting wins
    ("--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_ynn_fusion_type=individual_convolution", True),
])
def test_reads_which_library_runs_convolutions(flags, ynn):
    assert xla_flags.ynn_convolutions(flags) is ynn


def _fresh_process(code: str, xla_flags_env: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags_env is not None:
        env["XLA_FLAGS"] = xla_flags_env
    return subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_import_sets_the_flag_before_the_backend_starts_and_convolutions_leave_ynnpack():
    """In a fresh interpreter: the flag is in the environment, and the compiled convolution is Eigen's (no
    YNNPACK fusion in the optimised HLO); with the user's own YNNPACK choice it stays YNNPACK's."""
    code = """
import os, jax, jax.numpy as jnp
import atss_jax
from atss_jax import xla_flags
conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
hlo = jax.jit(conv).lower(jnp.ones((1, 16, 16, 64)), jnp.ones((3, 3, 64, 64))).compile().as_text()
print(os.environ['XLA_FLAGS'], '|', 'ynn' in hlo, '|', xla_flags.cpu_convolutions_on_ynn())
"""
    flags, ynn_in_hlo, on_ynn = _fresh_process(code, None).split(" | ")
    assert flags == xla_flags.EIGEN_CONVOLUTIONS and ynn_in_hlo == "False" and on_ynn == "False"
    mine = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
    flags, ynn_in_hlo, on_ynn = _fresh_process(code, mine).split(" | ")
    assert flags == mine and ynn_in_hlo == "True" and on_ynn == "True"


def test_a_backend_started_before_the_import_is_left_alone():
    code = """
import os, jax
jax.devices()
from atss_jax import xla_flags
print(os.environ.get('XLA_FLAGS', '<unset>'), '|', xla_flags.cpu_convolutions_on_ynn())
"""
    assert _fresh_process(code, None) == "<unset> | True"


def test_an_older_jaxlib_gets_no_unknown_flag(monkeypatch):
    """XLA aborts on flags it does not know: before jaxlib 0.10 nothing is added."""
    monkeypatch.setattr(xla_flags.importlib.metadata, "version", lambda name: "0.4.30")
    monkeypatch.setattr(xla_flags, "backend_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    xla_flags.configure()
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_the_answer_follows_the_flags_the_backend_will_read(monkeypatch):
    """After configure(), what XLA_FLAGS holds when the backend starts decides: removed, XLA's default (YNNPACK)."""
    monkeypatch.setattr(xla_flags, "_CONFIGURED_BEFORE_START", True)
    monkeypatch.setenv("XLA_FLAGS", xla_flags.EIGEN_CONVOLUTIONS)
    assert not xla_flags.cpu_convolutions_on_ynn()
    monkeypatch.delenv("XLA_FLAGS")
    assert xla_flags.cpu_convolutions_on_ynn()
