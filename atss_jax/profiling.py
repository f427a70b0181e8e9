"""A `jax.profiler` trace of a few training steps, written into the workdir for TensorBoard's Profile tab."""

from __future__ import annotations

import pathlib
import tempfile
from typing import Any

import jax
from absl import logging
from etils import epath

from atss_jax import errors


class StepTrace:
    """Traces steps ``first_step .. first_step + num_steps - 1`` (every host its own trace).

    The trace is written to a local folder first and then copied to ``workdir/plugins/profile/<run>/``,
    because the profiler writes through its own file system, which may not reach a bucket.
    """

    def __init__(self, workdir: str | epath.Path, first_step: int, num_steps: int):
        if num_steps < 0 or (num_steps and first_step < 1):
            raise errors.ConfigError(f"config.train.profile_steps={num_steps} and profile_first_step={first_step}: "
                                     "need profile_steps >= 0 and profile_first_step >= 1.")
        self.workdir = epath.Path(workdir)
        self.first_step, self.num_steps = first_step, num_steps
        self._local: tempfile.TemporaryDirectory | None = None

    def after_step(self, step: int, outputs: Any) -> None:
        """Call once before the first step (with the start step) and after every step with its outputs."""
        if not self.num_steps:
            return
        if step == self.first_step - 1 and self._local is None:
            self._local = tempfile.TemporaryDirectory(prefix="atss_trace_")
            jax.profiler.start_trace(self._local.name)
        elif step == self.first_step + self.num_steps - 1 and self._local is not None:
            self.stop(outputs)

    def stop(self, outputs: Any = None) -> None:
        """Ends a running trace (the loop may end inside the window) and copies it into the workdir."""
        if self._local is None:
            return
        jax.block_until_ready(outputs)  # the traced steps' device work belongs in the trace
        jax.profiler.stop_trace()
        local = pathlib.Path(self._local.name)  # always on this machine (epath refuses recursive globs)
        for file in local.rglob("*"):
            if file.is_file():
                target = self.workdir / file.relative_to(local)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(file.read_bytes())
        self._local.cleanup()
        self._local = None
        logging.info("Wrote a profile of steps %d-%d to %s (TensorBoard's Profile tab).", self.first_step,
                     self.first_step + self.num_steps - 1, self.workdir / "plugins" / "profile")
