"""XLA:CPU's convolution library, chosen before JAX starts its backend (``import atss_jax`` does it).

jaxlib 0.10 hands CPU convolutions to YNNPACK by default. On the detector's training step Eigen's
convolutions are faster (this 2-core CPU, R-50-FPN at 512x512, batch 2: forward and input gradients
1.0-2.5x, the 3x3 kernel gradients 3x; the step 8% faster; ``scripts/benchmark_peer.py --profile``
shows the per-op times), so the project turns YNNPACK's convolutions off and keeps its matrix
products. A user's own ``--xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` is kept as given.
The flag only concerns the CPU backend; GPUs and TPUs ignore it.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys

YNN_FUSION_TYPE = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_CONVOLUTIONS = f"{YNN_FUSION_TYPE}=-individual_convolution"


def with_eigen_convolutions(xla_flags: str) -> str:
    """``xla_flags`` plus ``EIGEN_CONVOLUTIONS``, unless they already choose YNNPACK's fusion types."""
    if YNN_FUSION_TYPE in xla_flags:
        return xla_flags
    return f"{xla_flags} {EIGEN_CONVOLUTIONS}".strip()


def ynn_convolutions(xla_flags: str) -> bool:
    """Whether XLA:CPU gives convolutions to YNNPACK under ``xla_flags`` (its default, unless the last
    ``--xla_cpu_experimental_ynn_fusion_type`` removes ``individual_convolution`` or lists types without it)."""
    settings = [flag.split("=", 1)[1] for flag in xla_flags.split() if flag.startswith(f"{YNN_FUSION_TYPE}=")]
    if not settings:
        return True
    types = [t for t in settings[-1].split(",") if t]
    if any(t[0] in "+-" for t in types):  # changes to the default set
        return "-individual_convolution" not in types
    return "individual_convolution" in types


def backend_started() -> bool:
    """Whether JAX has started its backends (XLA_FLAGS are read then, once)."""
    jax = sys.modules.get("jax")
    if jax is None:
        return False
    from jax._src import xla_bridge  # no public API tells whether the backends exist yet

    return xla_bridge.backends_are_initialized()


# Whether configure() ran before JAX's backend started, so that XLA_FLAGS (read once, at the start) says which
# library runs the convolutions; otherwise the flags the backend started with are unknown here.
_CONFIGURED_BEFORE_START = False


def _jaxlib_knows_the_flag() -> bool:
    """XLA aborts on a flag it does not know; jaxlib 0.10 (the pinned version) knows this one."""
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return False
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2]) >= (0, 10)


def configure() -> None:
    """Adds ``EIGEN_CONVOLUTIONS`` to ``XLA_FLAGS`` if JAX's backend has not started yet (and jaxlib knows it)."""
    global _CONFIGURED_BEFORE_START
    if backend_started() or not _jaxlib_knows_the_flag():
        return
    os.environ["XLA_FLAGS"] = with_eigen_convolutions(os.environ.get("XLA_FLAGS", ""))
    _CONFIGURED_BEFORE_START = True


def cpu_convolutions_on_ynn() -> bool:
    """Whether this process's XLA:CPU runs convolutions with YNNPACK (assumed when its flags are unknown)."""
    return not _CONFIGURED_BEFORE_START or ynn_convolutions(os.environ.get("XLA_FLAGS", ""))
