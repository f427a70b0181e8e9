"""The training loop: train, log, checkpoint, resume, evaluate (the step itself is `train_step.py`)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions
from etils import epath
from flax import traverse_util

from atss_jax import checkpoint, evaluator, parallel, profiling, workdirs
from atss_jax.data import pipeline
from atss_jax.train_step import NonFiniteLossError, TrainState, check_config, compile_train_step, create_training


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> dict | None:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint), evaluates, returns the final
    evaluation summary (None when stopped by preemption, and on hosts other than process 0)."""
    categories = pipeline.categories(config.data)
    check_config(config, len(categories.ids))
    if parallel.is_main_process():
        workdirs.write_config(workdir, config)
        workdirs.write_categories(workdir, categories.ids, categories.names)
    training = create_training(config)
    checkpoints = checkpoint.TrainCheckpoints(checkpoint.checkpoint_dir(workdir), config.train)
    state, mesh = checkpoints.restore(training.state), training.mesh
    train_fn = compile_train_step(config, training.model, training.optimizer, mesh)
    evaluate = evaluator.Evaluator(config, training.model, mesh)
    writer = metric_writers.create_default_writer(str(workdir), just_logging=not parallel.is_main_process())

    def evaluate_and_write(state: TrainState, step: int) -> dict | None:
        variables = {"params": state.params, **state.model_state}
        return evaluator.write_result(evaluate.run(variables, evaluator.step_dir(workdir, step)), workdir, step, writer)

    start_step, num_steps = int(state.step), config.train.num_steps
    if start_step >= num_steps:  # a finished run: evaluate its final state again
        return evaluate_and_write(state, start_step)
    if start_step == 0:
        hparams = traverse_util.flatten_dict(config.to_dict(), sep=".")
        writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()})
    progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
    trace = profiling.StepTrace(workdir, config.train.profile_first_step, config.train.profile_steps)
    trace.after_step(start_step, state)
    batches = pipeline.train_dataset(config.data, global_batch=config.train.global_batch, seed=config.seed,
                                     start_step=start_step).as_numpy_iterator()
    interval_metrics, interval_start, result = [], time.perf_counter(), None
    for step in range(start_step + 1, num_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = train_fn(state, parallel.to_global(next(batches), mesh))
        interval_metrics.append(metrics)
        trace.after_step(step, metrics)
        progress(step)
        last = step == num_steps
        if step % config.train.log_every == 0 or last:
            _raise_if_nonfinite(state)
            summary = {k: float(np.mean(v)) for k, v in jax.device_get(
                jax.tree.map(lambda *xs: jnp.stack(xs), *interval_metrics)).items()}
            elapsed = time.perf_counter() - interval_start
            summary["images_per_second"] = len(interval_metrics) * config.train.global_batch / elapsed
            summary["step_time_ms"] = 1000 * elapsed / len(interval_metrics)
            writer.write_scalars(step, summary)
            interval_metrics, interval_start = [], time.perf_counter()
        preempted = checkpoints.should_stop(step)
        if step % config.train.checkpoint_every == 0 or last or preempted:
            _raise_if_nonfinite(state)
            checkpoints.save(step, state)
        if preempted:
            checkpoints.wait()
            return None
        if (config.train.eval_every and step % config.train.eval_every == 0) or last:
            result = evaluate_and_write(state, step)
            interval_start = time.perf_counter()
    trace.stop(state)
    checkpoints.wait()
    if parallel.is_main_process():
        workdirs.mark_finished(workdir, num_steps, result and result["metrics"])
    writer.flush()
    return result


def _raise_if_nonfinite(state: TrainState) -> None:
    bad_step = int(jax.device_get(state.nonfinite_step))
    if bad_step >= 0:
        raise NonFiniteLossError(
            f"The loss or its gradients became non-finite at step {bad_step + 1}; the parameters were not "
            f"updated from then on. Lower config.optimizer.base_lr, set config.optimizer.clip_grad_norm, "
            f"or check the data of that step.")
