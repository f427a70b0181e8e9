"""The trainer: the train state, the per-device train step, and the loop.

`train_step` is written for ONE device's share of the batch with named-axis collectives over
`parallel.AXIS` (pmap semantics): the assigner runs inside, vmapped over the device's images; the loss
normalisers are averaged over devices; gradients are `pmean`-ed. `jax.shard_map` maps it over a 1-D
mesh of every device of every host, inside `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, periodic_actions
from etils import epath
from flax import traverse_util

from atss_jax import checkpoint, evaluator, losses, optim, parallel, profiling, workdirs
from atss_jax.anchors import AnchorGrid, anchor_valid_mask, anchors_per_location, build_anchor_grid
from atss_jax.assigners import AssignResult, build_assigner
from atss_jax.data import pipeline, transforms
from atss_jax.models.detector import build_detector, frozen_parameter_mask, init_detector
from atss_jax.parallel import AXIS

# (grid, anchor_valid [B, A], batch) -> the assignment of the batch's anchors.
AssignBatch = Callable[[AnchorGrid, jax.Array, dict], AssignResult]


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient; parameters were not updated with it."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    model_state: Any  # the variables outside `params`: frozen BN statistics, trainable BN statistics
    opt_state: Any
    # First step whose loss or gradients were not finite (-1: none). From then on updates are skipped.
    nonfinite_step: jax.Array


def check_config(config: ml_collections.ConfigDict, num_categories: int) -> None:
    """Errors for settings that would train silently wrong, explained, before anything is built."""
    if num_categories != config.model.num_classes:
        raise ValueError(f"The dataset has {num_categories} categories but config.model.num_classes="
                         f"{config.model.num_classes}.")
    backbone = config.model.backbone
    if backbone.norm == "frozen_bn" and not backbone.pretrained:
        raise ValueError("config.model.backbone.norm='frozen_bn' freezes BatchNorm at ImageNet statistics: it needs "
                         "config.model.backbone.pretrained (convert torchvision weights with "
                         "scripts/convert_torchvision.py), or use norm='gn' or 'bn' to train from scratch.")
    if config.train.global_batch % jax.device_count():
        raise ValueError(f"config.train.global_batch={config.train.global_batch} is not a multiple of the "
                         f"{jax.device_count()} devices.")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    return optim.learning_rate_schedule(config.optimizer, global_batch=config.train.global_batch,
                                        num_steps=config.train.num_steps)


def assign_batch(grid: AnchorGrid, anchor_valid: jax.Array, batch: dict, *,
                 config: ml_collections.ConfigDict) -> AssignResult:
    """The configured assigner (``config.assigner``) on the batch's boxes: what training runs."""
    return build_assigner(config.assigner, grid)(anchor_valid, batch["boxes"], batch["box_valid"])


def train_step(state: TrainState, batch: dict[str, jax.Array], *, config: ml_collections.ConfigDict,
               model: nn.Module, optimizer: optax.GradientTransformation,
               assign: AssignBatch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on one device's share of the batch (call it under shard_map over AXIS)."""
    grid = build_anchor_grid(config.anchors, batch["image"].shape[1:3])
    anchor_valid = anchor_valid_mask(grid.centers, batch["image_size"])
    assignment = assign(grid, anchor_valid, batch)

    def loss_fn(params):
        outputs, new_model_state = model.apply({"params": params, **state.model_state}, batch["image"], train=True,
                                               mutable=["batch_stats"])
        terms = losses.detection_losses(
            *outputs, anchors=jnp.asarray(grid.boxes), anchor_strides=jnp.asarray(grid.anchor_strides),
            anchor_valid=anchor_valid, gt_index=assignment.gt_index, gt_boxes=batch["boxes"],
            gt_labels=batch["labels"], config=config.loss, regression=config.model.head.regression,
            use_centerness=config.model.head.use_centerness, axis_name=AXIS)
        return terms.total, (terms, new_model_state)

    grads, (terms, new_model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(jax.lax.pmean(grads, AXIS), state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = {**state.model_state, **jax.lax.pmean(dict(new_model_state), AXIS)}

    finite = jax.lax.pmin(jnp.isfinite(terms.total).astype(jnp.int32), AXIS) > 0
    # Non-finite gradients or a too-large step both show up in the updated parameters.
    finite &= jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    healthy = finite & (state.nonfinite_step < 0)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(healthy, new, old))
    new_state = TrainState(
        step=state.step + 1, params=keep(params, state.params), model_state=keep(model_state, state.model_state),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step))

    box_count = jax.lax.psum(jnp.sum(batch["box_valid"]), AXIS)

    def per_box(value):
        return jax.lax.psum(jnp.sum(jnp.where(batch["box_valid"], value, 0.0)), AXIS) / jnp.maximum(box_count, 1)

    metrics = {
        "loss": jax.lax.pmean(terms.total, AXIS),
        "loss_classification": jax.lax.pmean(terms.classification, AXIS),
        "loss_box": jax.lax.pmean(terms.box, AXIS),
        "loss_centerness": jax.lax.pmean(terms.centerness, AXIS),
        "learning_rate": learning_rate_schedule(config)(state.step),
        "assign/positives_per_box": per_box(assignment.num_positives.astype(jnp.float32)),
        "assign/iou_threshold": per_box(assignment.iou_threshold),
        "assign/boxes_without_positive": per_box((assignment.num_positives == 0).astype(jnp.float32)),
        "boxes_per_image": box_count / jax.lax.psum(batch["image"].shape[0], AXIS),
    }
    return new_state, metrics


def compile_train_step(config: ml_collections.ConfigDict, model: nn.Module, optimizer: optax.GradientTransformation,
                       mesh: jax.sharding.Mesh, assign: AssignBatch | None = None) -> Callable:
    """jit(shard_map(train_step)) with the state donated; ``assign`` defaults to the configured assigner."""
    step = functools.partial(train_step, config=config, model=model, optimizer=optimizer,
                             assign=assign or functools.partial(assign_batch, config=config))
    # check_vma=False keeps pmap's per-device semantics, which train_step is written for. With the check on,
    # JAX treats the replicated parameters as device-invariant and the transpose of their implicit broadcast
    # sums every gradient over devices, so the pmean in train_step would see summed gradients (checked on 2
    # devices: first updates up to twice as large as with the check off).
    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(parallel.REPLICATED_SPEC, parallel.BATCH_SPEC),
                                 out_specs=(parallel.REPLICATED_SPEC, parallel.REPLICATED_SPEC), check_vma=False),
                   donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class Training:
    """The model, its optimiser and a fresh train state of a config (``create_training``)."""

    mesh: jax.sharding.Mesh
    model: nn.Module
    optimizer: optax.GradientTransformation
    state: TrainState  # step 0, the backbone's pretrained weights loaded; replicated over the mesh


def create_training(config: ml_collections.ConfigDict) -> Training:
    """The detector, optimiser and initial state of ``config``; resuming restores a checkpoint into the state."""
    mesh = parallel.make_mesh()
    canvas = transforms.canvases(config.data)[0]
    model = build_detector(config.model, anchors_per_location(config.anchors), axis_name=AXIS)
    variables = jax.device_get(init_detector(model, config.model, jax.random.key(config.seed), canvas))
    params = variables.pop("params")
    optimizer = optim.make_optimizer(config.optimizer, learning_rate_schedule(config),
                                     frozen_parameter_mask(params, config.model.backbone.frozen_stages))

    # Every host computes the same initial state from the same seed.
    @functools.partial(jax.jit, out_shardings=jax.sharding.NamedSharding(mesh, parallel.REPLICATED_SPEC))
    def initial_state(params, model_state):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=optimizer.init(params), nonfinite_step=jnp.full((), -1, jnp.int32))

    return Training(mesh, model, optimizer, initial_state(params, variables))


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
