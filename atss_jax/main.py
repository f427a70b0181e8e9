r"""Entry point: train (with periodic evaluation) or evaluate a checkpoint.

    python -m atss_jax.main --config=configs/atss_r50_fpn_1x_coco.py --workdir=gs://bucket/atss \
        [--config.assigner.topk=7]
    python -m atss_jax.main --workdir=gs://bucket/atss                        # resume with the workdir's config
    python -m atss_jax.main --workdir=gs://bucket/atss --mode=eval [--checkpoint_step=N]
    python -m atss_jax.main --workdir=gs://bucket/atss --mode=eval --config.data.data_dir=/local/tfds

A `--config.*` override without `--config` applies on top of the workdir's config.json (workdir_config.py).

Exit codes: 0 done; 1 an error (a refusal of bad input is one line, ``atss_jax.main: ...``; a bug's cause is
printed before its traceback); 2 a command line that does not parse (one line, atss_jax/cli.py); 143
(`preemption.PREEMPTED_EXIT_CODE`, 128 + SIGTERM) stopped by SIGTERM after saving: run the same command to resume.

Every process of a multi-process job runs the same command; `atss_jax.cluster` joins the job the launcher
describes (srun, mpirun, an indexed Kubernetes Job, JAX_COORDINATOR_ADDRESS, a Cloud TPU VM slice) and picks
the GPUs each process drives (one process per GPU or one per node).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from atss_jax import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py). Default: the workdir's config.json, i.e. resume or "
    "evaluate with the config the run was started with (--config.* overrides apply on top of it).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (or gs:// bucket path) for checkpoints, metrics, "
                               "evaluation outputs and the run's config.json.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes from the workdir) or eval only.")
_CHECKPOINT_STEP = flags.DEFINE_integer("checkpoint_step", None, "eval mode: the step to evaluate (default latest).")
_ALLOW_CPU = flags.DEFINE_bool("allow_cpu", False, "Run a config that declares it needs an accelerator "
                               "(config.requires_accelerator: the COCO configs) on a CPU-only JAX anyway.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"], "auto: join the multi-process job the launcher started (srun, "
    "mpirun, an indexed Kubernetes Job, JAX_COORDINATOR_ADDRESS) or, when training, the Cloud TPU VM slice; "
    "on: the same, where finding none is an error (also joins a TPU slice to evaluate); off: one process.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for clusters JAX does "
                                   "not detect by itself (also needs --num_processes and --process_id).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the job (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["workdir"])


def check_backend(config, allow_cpu: bool) -> None:
    """Stops a config that needs an accelerator from training silently on the CPU."""
    import jax

    if jax.default_backend() == "cpu" and config.get("requires_accelerator", False) and not allow_cpu:
        raise errors.Refusal(
            "This config needs an accelerator (config.requires_accelerator=True) but JAX sees only the CPU. "
            "Install the accelerator's JAX (bash scripts/setup.sh cuda12 or tpu, see README \"Install\"), or "
            "pass --allow_cpu to run on the CPU anyway.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from atss_jax import cluster, parallel

    # Before anything touches a JAX backend. Evaluation joins a TPU slice only when asked (--distributed=on):
    # run alone on one worker, or on a VM beside the training job, it must not wait for the slice.
    mode = "launcher" if _MODE.value == "eval" and _DISTRIBUTED.value == "auto" else _DISTRIBUTED.value
    cluster.join(mode, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    import tensorflow as tf

    # TF only feeds data: keep it off the accelerators.
    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")
    from atss_jax import evaluator, preemption, train, workdirs

    logging.info(parallel.describe_devices())
    try:
        config = _CONFIG.value if _CONFIG.value is not None else workdirs.read_config(_WORKDIR.value)
    except workdirs.WorkdirError as error:
        error.add_note("Start a run with --config=configs/....py.")
        raise
    check_backend(config, _ALLOW_CPU.value)
    try:
        if _MODE.value == "train":
            train.train(config, _WORKDIR.value)
        else:
            evaluator.evaluate_checkpoint(config, _WORKDIR.value, _CHECKPOINT_STEP.value)
    except preemption.Preempted as stop:
        print(stop, file=sys.stderr, flush=True)
        sys.exit(preemption.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    from atss_jax import cli, workdir_config

    cli.run(main, "atss_jax.main", argv=workdir_config.with_workdir_config(sys.argv))
