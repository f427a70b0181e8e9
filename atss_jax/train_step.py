"""The train step: the train state, the per-device step, its compiled form and a fresh training.

`train_step` is written for ONE device's share of the batch with named-axis collectives over
`parallel.AXIS` (pmap semantics): the assigner runs inside, vmapped over the device's images; the loss
normalisers are averaged over devices; gradients are `pmean`-ed. `jax.shard_map` maps it over a 1-D
mesh of every device of every host, inside `jax.jit`. Nothing here imports the input pipeline or the
evaluator (no TensorFlow, TFDS or clu), so the benchmarks run it on synthetic batches anywhere; the loop
is `train.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from etils import epath

from atss_jax import boxes as box_lib
from atss_jax import errors, init_from, losses, optim, parallel
from atss_jax.anchors import AnchorGrid, anchor_valid_mask, anchors_per_location, build_anchor_grid
from atss_jax.assigners import AssignResult, Predictions, SoftAssignment, build_assigner, is_prediction_aware
from atss_jax.data.canvas import canvases
from atss_jax.models import caffe2_import
from atss_jax.models.detector import build_detector, frozen_parameter_mask, init_detector
from atss_jax.parallel import AXIS

# (grid, anchor_valid [B, A], batch) -> the assignment of the batch's anchors; a prediction-aware assigner is
# also given `predictions=` (assigners.Predictions) and `step=` and returns an assigners.SoftAssignment.
AssignBatch = Callable[..., AssignResult | SoftAssignment]


class NonFiniteLossError(errors.Refusal, FloatingPointError):
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
        raise errors.ConfigError(f"The dataset has {num_categories} categories but config.model.num_classes="
                                 f"{config.model.num_classes}.")
    backbone = config.model.backbone
    if backbone.pretrained and not epath.Path(backbone.pretrained).exists():
        # Checked here, not when the weights load after a minute of building the model.
        raise errors.MissingFileError(
            f"config.model.backbone.pretrained={backbone.pretrained!r} does not exist: give the path of the "
            "converted weights (scripts/convert_torchvision.py, or a Detectron .pkl).")
    if backbone.norm == "frozen_bn" and not backbone.pretrained and not config.init_from:
        raise errors.ConfigError(
            "config.model.backbone.norm='frozen_bn' freezes BatchNorm at ImageNet statistics: it needs "
            "config.model.backbone.pretrained (convert torchvision weights with scripts/convert_torchvision.py, "
            "or give a Detectron .pkl as it is), or use norm='gn' or 'bn' to train from scratch.")
    if caffe2_import.is_caffe2_file(backbone.pretrained) and config.model.input_channels != "bgr":
        # The file cannot say so itself: Caffe2 blobs have the same shapes whatever input they were trained on.
        raise errors.ConfigError(
            f"config.model.backbone.pretrained={backbone.pretrained} is a Detectron Caffe2 pickle, trained on BGR "
            f"images minus Detectron's means, but config.model.input_channels={config.model.input_channels!r}: use "
            "an ':official' config (base.with_official_recipe) or set input_channels='bgr', pixel_mean and "
            "pixel_std as it does.")
    if config.train.global_batch % jax.device_count():
        raise errors.ConfigError(f"config.train.global_batch={config.train.global_batch} is not a multiple of the "
                                 f"{jax.device_count()} devices.")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    return optim.learning_rate_schedule(config.optimizer, global_batch=config.train.global_batch,
                                        num_steps=config.train.num_steps)


def assign_batch(grid: AnchorGrid, anchor_valid: jax.Array, batch: dict, *, config: ml_collections.ConfigDict,
                 predictions: Predictions | None = None, step: jax.Array | None = None
                 ) -> AssignResult | SoftAssignment:
    """The configured assigner (``config.assigner``) on the batch's boxes: what training runs. A prediction-aware
    one (``assigners.is_prediction_aware``) also reads ``predictions`` and the train ``step``."""
    assign = build_assigner(config.assigner, grid)
    if is_prediction_aware(config.assigner):
        return assign(anchor_valid, batch["boxes"], batch["box_valid"], batch["labels"], predictions, step)
    return assign(anchor_valid, batch["boxes"], batch["box_valid"])


def train_step(state: TrainState, batch: dict[str, jax.Array], *, config: ml_collections.ConfigDict,
               model: nn.Module, optimizer: optax.GradientTransformation,
               assign: AssignBatch) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on one device's share of the batch (call it under shard_map over AXIS)."""
    grid = build_anchor_grid(config.anchors, batch["image"].shape[1:3])
    anchor_valid = anchor_valid_mask(grid.centers, batch["image_size"])
    anchors, anchor_strides = jnp.asarray(grid.boxes), jnp.asarray(grid.anchor_strides)
    aware = is_prediction_aware(config.assigner)
    # A prediction-aware assigner runs inside loss_fn, on the gradient-stopped outputs of its one forward pass.
    assignment = None if aware else assign(grid, anchor_valid, batch)

    def loss_fn(params):
        outputs, new_model_state = model.apply({"params": params, **state.model_state}, batch["image"],
                                               batch["image_size"], train=True, mutable=["batch_stats"])
        result, quality = assignment, None
        if aware:
            class_logits, box_regression, _ = jax.lax.stop_gradient(outputs)
            predictions = Predictions(
                scores=jax.nn.sigmoid(class_logits.astype(jnp.float32)),
                boxes=box_lib.decode_regression(config.model.head.regression, anchors, anchor_strides,
                                                box_regression.astype(jnp.float32), config.model.head.box_coder))
            result, quality = assign(grid, anchor_valid, batch, predictions=predictions, step=state.step)
        terms = losses.detection_losses(
            *outputs, anchors=anchors, anchor_strides=anchor_strides,
            anchor_valid=anchor_valid, gt_index=result.gt_index, gt_boxes=batch["boxes"],
            gt_labels=batch["labels"], config=config.loss, regression=config.model.head.regression,
            use_centerness=config.model.head.use_centerness, axis_name=AXIS, quality_targets=quality,
            box_coder=config.model.head.box_coder)
        return terms.total, (terms, new_model_state, result)

    grads, (terms, new_model_state, assignment) = jax.grad(loss_fn, has_aux=True)(state.params)
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
    canvas = canvases(config.data)[0]
    model = build_detector(config.model, anchors_per_location(config.anchors), axis_name=AXIS)
    variables = jax.device_get(init_detector(model, config.model, jax.random.key(config.seed), canvas))
    variables = init_from.load_initial_variables(config, variables)
    params = variables.pop("params")
    optimizer = optim.make_optimizer(config.optimizer, learning_rate_schedule(config),
                                     frozen_parameter_mask(params, config.model.backbone.frozen_stages))

    # Every host computes the same initial state from the same seed.
    @functools.partial(jax.jit, out_shardings=jax.sharding.NamedSharding(mesh, parallel.REPLICATED_SPEC))
    def initial_state(params, model_state):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=optimizer.init(params), nonfinite_step=jnp.full((), -1, jnp.int32))

    return Training(mesh, model, optimizer, initial_state(params, variables))
