"""The config a workdir's run was started with (its config.json), for command-line overrides on a workdir.

    python -m atss_jax.main --workdir=gs://bucket/run --mode=eval --config.data.data_dir=/local/tfds

`atss_jax.main` passes ``--config=<this file>:<workdir>`` itself when a ``--config.*`` override comes
without ``--config``; the overrides then apply on top of the workdir's config.
"""

import ml_collections
from etils import epath

from atss_jax import workdirs


def get_config(workdir: str) -> ml_collections.ConfigDict:
    return workdirs.read_config(workdir)


def with_workdir_config(argv: list[str]) -> list[str]:
    """``argv`` with ``--config=<this file>:<workdir>`` added where it has ``--config.*`` overrides and a
    ``--workdir`` but no ``--config``: the overrides then apply to the workdir's config.json."""
    overrides = any(arg.startswith("--config.") for arg in argv[1:])
    has_config = any(arg == "--config" or arg.startswith("--config=") for arg in argv[1:])
    workdir = next((arg.split("=", 1)[1] if "=" in arg else value for arg, value in zip(argv[1:], [*argv[2:], None])
                    if arg == "--workdir" or arg.startswith("--workdir=")), None)
    if not overrides or has_config or workdir is None:
        return argv
    return [argv[0], f"--config={epath.Path(__file__)}:{workdir}", *argv[1:]]
