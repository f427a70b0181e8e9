"""The training loop: train, log, checkpoint, resume, evaluate (the step itself is `train_step.py`).

Faults leave a workdir that resumes: an exception lets pending checkpoint saves finish first; a diverged
run (a non-finite loss, or the loss above ``config.train.divergence_factor`` x its lowest) keeps no
checkpoint of the diverged steps; SIGTERM saves the current step and raises `preemption.Preempted`.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import metric_writers, periodic_actions
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from atss_jax import checkpoint, errors, evaluator, parallel, preemption, profiling, workdirs
from atss_jax.data import pipeline
from atss_jax.train_step import NonFiniteLossError, TrainState, check_config, compile_train_step, create_training


class DivergedError(errors.Refusal, FloatingPointError):
    """The loss exploded (finite, but far above its lowest); the diverged steps' checkpoints were removed."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> dict | None:
    """`train`, returning None when stopped by preemption (after saving the step reached)."""
    try:
        return train(config, workdir)
    except preemption.Preempted:
        return None


def train(config: ml_collections.ConfigDict, workdir: str | epath.Path) -> dict | None:
    """Trains ``config`` in ``workdir`` (resuming from its latest readable checkpoint), evaluates, returns the
    final evaluation summary (None on hosts other than process 0).

    Raises:
      preemption.Preempted: SIGTERM; the step reached is saved, and running again resumes from it.
      NonFiniteLossError, DivergedError: the run diverged; its last good checkpoint is kept (see the message).
    """
    categories = pipeline.categories(config.data)
    check_config(config, len(categories.ids))
    # Before the model is built: a missing evaluation split would otherwise stop the run after training.
    pipeline.open_split(config.data, config.data.eval_split)
    if parallel.is_main_process():
        workdirs.write_config(workdir, config)
        workdirs.write_categories(workdir, categories.ids, categories.names)
    training = create_training(config)
    checkpoints = checkpoint.TrainCheckpoints(checkpoint.checkpoint_dir(workdir), config.train)
    state = checkpoints.restore(training.state)
    try:
        return _train_loop(config, workdir, training, checkpoints, state)
    except BaseException as error:
        checkpoints.finish_or_clean()
        if not isinstance(error, (preemption.Preempted, FloatingPointError)):
            latest = checkpoints.manager.latest_step()
            error.add_note("Training stopped by this error; " + (
                f"the newest checkpoint is {checkpoints.directory / str(latest)}: running the same command resumes "
                f"from it." if latest is not None else "no checkpoint was saved."))
        raise


def _train_loop(config: ml_collections.ConfigDict, workdir: str | epath.Path, training,
                checkpoints: checkpoint.TrainCheckpoints, state: TrainState) -> dict | None:
    mesh = training.mesh
    train_fn = compile_train_step(config, training.model, training.optimizer, mesh)
    evaluate = evaluator.Evaluator(config, training.model, mesh, checkpoints.sigterm)
    writer = metric_writers.create_default_writer(str(workdir), just_logging=not parallel.is_main_process())

    def evaluate_and_write(state: TrainState, step: int) -> dict | None:
        variables = {"params": state.params, **state.model_state}
        return evaluator.write_result(evaluate.run(variables, evaluator.step_dir(workdir, step)), workdir, step, writer)

    def is_eval_step(step: int) -> bool:
        if config.train.eval_every < 0:  # never: the checkpoints are evaluated apart (--mode=eval)
            return False
        return bool(config.train.eval_every and step % config.train.eval_every == 0) or step == num_steps

    def finish(result: dict | None) -> dict | None:
        if parallel.is_main_process():
            workdirs.mark_finished(workdir, num_steps, result and result["metrics"])
        writer.flush()
        return result

    start_step, num_steps = int(state.step), config.train.num_steps
    print(f"Training steps {start_step + 1}..{num_steps} in {workdir}.", flush=True)
    if start_step >= num_steps:  # a finished run (or one preempted in its final evaluation): evaluate it again
        return finish(evaluate_and_write(state, start_step) if is_eval_step(start_step) else None)
    if start_step == 0:
        hparams = traverse_util.flatten_dict(config.to_dict(), sep=".")
        writer.write_hparams({k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()})
    elif is_eval_step(start_step) and not _evaluated(workdir, start_step):  # preempted while evaluating
        evaluate_and_write(state, start_step)
    progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
    trace = profiling.StepTrace(workdir, config.train.profile_first_step, config.train.profile_steps)
    trace.after_step(start_step, state)
    batches = pipeline.train_dataset(config.data, global_batch=config.train.global_batch, seed=config.seed,
                                     start_step=start_step).as_numpy_iterator()
    guard = _DivergenceGuard(config, workdir, checkpoints)
    interval_metrics, unchecked, interval_start, result = [], [], time.perf_counter(), None
    for step in range(start_step + 1, num_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = train_fn(state, parallel.to_global(next(batches), mesh))
        interval_metrics.append(metrics)
        unchecked.append((step, metrics["loss"]))
        trace.after_step(step, metrics)
        progress(step)
        last = step == num_steps
        logged = step % config.train.log_every == 0 or last
        if logged:
            summary = {k: float(np.mean(v)) for k, v in jax.device_get(
                jax.tree.map(lambda *xs: jnp.stack(xs), *interval_metrics)).items()}
            elapsed = time.perf_counter() - interval_start
            summary["images_per_second"] = len(interval_metrics) * config.train.global_batch / elapsed
            summary["step_time_ms"] = 1000 * elapsed / len(interval_metrics)
            writer.write_scalars(step, summary)
            interval_metrics, interval_start = [], time.perf_counter()
        preempted = checkpoints.should_stop(step)
        save = step % config.train.checkpoint_every == 0 or last or preempted
        evaluating = is_eval_step(step)
        if logged or save or evaluating:
            guard.check(state, unchecked)  # before anything is saved or evaluated
            unchecked = []
        if save:
            checkpoints.save(step, state)
        if preempted:
            _stop_preempted(checkpoints, step)
        if evaluating:
            try:
                result = evaluate_and_write(state, step)
            except preemption.Preempted:
                if not save:
                    checkpoints.save(step, state)
                _stop_preempted(checkpoints, step)
            interval_start = time.perf_counter()
    trace.stop(state)
    checkpoints.wait()
    return finish(result)


def _evaluated(workdir: str | epath.Path, step: int) -> bool:
    """Whether the evaluation of ``step`` wrote its metrics (process 0's view, which every host takes)."""
    done = parallel.is_main_process() and (evaluator.step_dir(workdir, step) / evaluator.METRICS_FILE).exists()
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(done)))


def _stop_preempted(checkpoints: checkpoint.TrainCheckpoints, step: int):
    checkpoints.wait()
    raise preemption.Preempted(
        f"Preempted (SIGTERM) at step {step}: checkpoint {checkpoints.directory / str(step)} is saved. Run the "
        f"same command again to resume from it (exit code {preemption.PREEMPTED_EXIT_CODE} asks the scheduler to).")


class _DivergenceGuard:
    """Stops a diverged run: a non-finite loss or update, or the mean loss of the steps since the last check
    above ``config.train.divergence_factor`` x the lowest such mean so far (in this process: a resumed run
    starts afresh)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str | epath.Path,
                 checkpoints: checkpoint.TrainCheckpoints):
        self.config, self.workdir, self.checkpoints = config, workdir, checkpoints
        self.factor = config.train.divergence_factor
        self.lowest = float("inf")

    def check(self, state: TrainState, losses: list[tuple[int, jax.Array]]) -> None:
        """``losses``: (step, loss) of the steps since the last check; ``state``: after the last of them."""
        steps = [s for s, _ in losses]
        values = np.asarray(jax.device_get([v for _, v in losses]), np.float64)
        nonfinite_update = int(jax.device_get(state.nonfinite_step))  # 0-based: the update of step + 1
        mean = float(np.mean(values))
        limit = self.factor * self.lowest if self.factor else float("inf")
        if nonfinite_update < 0 and np.isfinite(mean) and mean <= limit:
            self.lowest = min(self.lowest, mean)
            return
        bad = ~np.isfinite(values) | (values > limit)
        first_bad = int(np.argmax(bad)) if bad.any() else None
        if first_bad is not None and (nonfinite_update < 0 or steps[first_bad] <= nonfinite_update + 1):
            # A step's loss is computed from the parameters of the step before: that checkpoint diverged too.
            step, removed_from, nonfinite = steps[first_bad], steps[first_bad] - 1, not np.isfinite(values[first_bad])
        else:  # a finite loss whose update was not: the checkpoint before it is good
            step, removed_from, nonfinite = nonfinite_update + 1, nonfinite_update + 1, True
        kept = self.checkpoints.remove_from(removed_from)
        if nonfinite:
            error, what = NonFiniteLossError, (
                f"The loss or its gradients became non-finite at step {step}; the parameters were not updated "
                f"from then on.")
        else:
            error, what = DivergedError, (
                f"Training diverged at step {step}: the mean loss since the last check, {mean:.4g}, exceeds "
                f"config.train.divergence_factor={self.factor:g} x its lowest mean so far, {self.lowest:.4g}.")
        raise error(f"{what} {self._advice(kept)}")

    def _advice(self, kept: list[int]) -> str:
        lower = self.config.optimizer.base_lr / 10
        # The workdir's config.json holds every other field of this run, the user's overrides included.
        command = f"python -m atss_jax.main --workdir={self.workdir} --config.optimizer.base_lr={lower:g}"
        if not kept:
            return (f"No checkpoint of before the divergence exists: restarting with a lower learning rate "
                    f"(e.g. {command}) trains from step 0. Or set config.optimizer.clip_grad_norm, or check the data.")
        return (f"No checkpoint of the diverged steps is kept: the last good one is step {kept[-1]} in "
                f"{self.checkpoints.directory}. Resume from it with a lower learning rate, e.g. {command} (or set "
                f"config.optimizer.clip_grad_norm, or check the data of those steps).")
