"""Preemption: SIGTERM, what schedulers send before they take a machine back, stops training, evaluation and
export at the next step or batch, after saving what is done; the process then exits with
``PREEMPTED_EXIT_CODE`` and the same command resumes.
"""

from __future__ import annotations

import signal

# 128 + SIGTERM: the code a shell or container runtime reports for a process that SIGTERM ended, which
# schedulers already read as "preempted, restart me" (e.g. a Kubernetes podFailurePolicy rule on 143, a
# SLURM script that requeues on it). Never used for an error.
PREEMPTED_EXIT_CODE = 128 + int(signal.SIGTERM)


class Preempted(Exception):
    """SIGTERM stopped the run after saving what it had done; rerunning the same command resumes it."""


class SigtermFlag:
    """Set by SIGTERM once installed (in the main thread: signal handlers can only be installed there)."""

    def __init__(self):
        self.requested = False

    def install(self) -> SigtermFlag:
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread (e.g. under some test runners): no handler
            pass
        return self

    def _on_sigterm(self, signum, frame) -> None:
        del signum, frame
        self.requested = True
