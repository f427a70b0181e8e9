r"""Entry point: train (with periodic evaluation) or evaluate a checkpoint.

    python -m atss_jax.main --config=configs/atss_r50_fpn_1x_coco.py --workdir=/tmp/atss \
        [--config.assigner.topk=7] [--mode=eval [--checkpoint_step=N]]

Every host of a multi-host job runs the same command; `jax.distributed.initialize()` connects them
(on TPU pods and SLURM/Kubernetes GPU clusters it discovers its peers itself).
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation outputs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes from the workdir) or eval only.")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None, "eval mode: the step to evaluate (default latest).")
_MULTIHOST = flags.DEFINE_bool("multihost", None, "Call jax.distributed.initialize(); default: when the "
                               "environment says there are several processes (TPU pod, SLURM, coordinator).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for clusters JAX does "
                                   "not detect by itself (also needs --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the job (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def _wants_distributed() -> bool:
    if _MULTIHOST.value is not None:
        return _MULTIHOST.value
    markers = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
    return any(int(os.environ.get(m, "1") if m.endswith(("NTASKS", "SIZE")) else 2) > 1
               for m in markers if m in os.environ)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax
    import tensorflow as tf

    # TF only feeds data: keep it off the accelerators.
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
    if _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _wants_distributed():
        jax.distributed.initialize()
    from atss_jax import evaluator, train

    logging.info("JAX process %d/%d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    config = _CONFIG.value
    if _MODE.value == "train":
        train.train_and_evaluate(config, _WORKDIR.value)
    else:
        evaluator.evaluate_checkpoint(config, _WORKDIR.value, _CHECKPOINT_STEP.value)


if __name__ == "__main__":
    app.run(main)
