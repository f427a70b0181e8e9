"""XLA:CPU flags for the test suite: programs compiled without LLVM's slow optimisations, run on one thread.

The suite compiles far more than it runs (hundreds of small programs, most run a few times). Without LLVM's
optimisations XLA:CPU compiles them about 40% faster (the assigner grid tests: 136 s -> 83 s on one core of
a 2-core machine), and even the tests that train for a hundred steps finish 13% sooner (overfit and TAL:
200 s -> 174 s): convolutions and matrix products run in their libraries either way. The suite keeps every
core busy with several workers and their subprocesses, so one thread per program wastes no time waiting for
others (overfit, TAL and models on three workers: 183 s -> 172 s). ``tests/conftest.py`` adds the flags to
this process's environment before JAX starts, so the subprocesses inherit them.
"""

import os
import re

FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
         "--xla_cpu_multi_thread_eigen=false")
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=\S*")


def with_test_flags(xla_flags: str) -> str:
    """``xla_flags`` plus ``FLAGS`` (once)."""
    return xla_flags if FLAGS in xla_flags else f"{xla_flags} {FLAGS}".strip()


def with_devices(devices: int) -> str:
    """This process's ``XLA_FLAGS`` with `devices` simulated CPU devices instead of any count it names."""
    flags = _DEVICE_COUNT.sub("", os.environ.get("XLA_FLAGS", ""))
    return " ".join([*flags.split(), f"--xla_force_host_platform_device_count={devices}"])
