"""Training and evaluation: pure per-device steps mapped over every device, and the one loop.

`train_step` and `eval_step` are written for ONE device's share of the batch with named-axis
collectives over `AXIS` (pmap semantics): the assigner runs inside, vmapped over the device's
images; the loss normalisers are averaged over devices; gradients are `pmean`-ed. `jax.shard_map`
maps them over a 1-D mesh of every device of every host, inside `jax.jit`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metric_writers, periodic_actions
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from atss_jax import boxes as box_lib
from atss_jax import checkpoint, evaluate, losses, postprocess, tta, visualise
from atss_jax.anchors import anchor_valid_mask, make_anchor_grid
from atss_jax.assigners import build_assigner
from atss_jax.assigners.result import AssignResult
from atss_jax.data import pipeline
from atss_jax.models.detector import build_detector, frozen_parameter_mask, init_detector

AXIS = "data"


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


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over every device of every host."""
    return jax.make_mesh((jax.device_count(),), (AXIS,))


def anchor_grid(config: ml_collections.ConfigDict, canvas: tuple[int, int]):
    return make_anchor_grid(tuple(canvas), tuple(config.anchors.strides), config.anchors.octave_base_scale,
                            tuple(config.anchors.scales), tuple(config.anchors.aspect_ratios))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup, then steps of `lr_decay` at the `lr_milestones` fractions of training.

    The base rate is for `base_batch` images and scales linearly with the global batch.
    """
    opt = config.optimizer
    peak = opt.base_lr * config.train.global_batch / opt.base_batch
    total = config.train.num_steps
    boundaries = {round(m * total): opt.lr_decay for m in opt.lr_milestones}
    decay = optax.piecewise_constant_schedule(peak, boundaries)

    def schedule(step):
        warmup = opt.warmup_factor + (1 - opt.warmup_factor) * jnp.minimum(step / max(opt.warmup_steps, 1), 1.0)
        return decay(step) * warmup

    return schedule


def _decay_mask(params: Any, decay_norm_and_bias: bool) -> Any:
    """True where weight decay applies: everything, or only kernels (ndim > 1) when norms and biases are exempt."""
    return jax.tree.map(lambda p: decay_norm_and_bias or p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, params: Any) -> optax.GradientTransformation:
    """SGD with momentum, masked weight decay, optional clipping; frozen backbone stages untouched."""
    opt = config.optimizer
    transforms = []
    if opt.clip_grad_norm:
        transforms.append(optax.clip_by_global_norm(opt.clip_grad_norm))
    transforms += [
        optax.add_decayed_weights(opt.weight_decay, mask=functools.partial(
            _decay_mask, decay_norm_and_bias=opt.decay_norm_and_bias)),
        optax.sgd(learning_rate_schedule(config), momentum=opt.momentum),
    ]
    frozen = frozen_parameter_mask(params, config.model.backbone.frozen_stages)
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    return optax.multi_transform({"train": optax.chain(*transforms), "frozen": optax.set_to_zero()}, labels)


def create_train_state(config: ml_collections.ConfigDict, model, canvas: tuple[int, int],
                       mesh: jax.sharding.Mesh) -> tuple[TrainState, optax.GradientTransformation]:
    """Initial state, replicated over the mesh (every host computes the same from the same seed)."""
    variables = jax.device_get(init_detector(model, config.model, jax.random.key(config.seed), canvas))
    params = variables.pop("params")
    optimizer = make_optimizer(config, params)
    replicated = NamedSharding(mesh, P())

    @functools.partial(jax.jit, out_shardings=replicated)
    def build(params, model_state):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                          opt_state=optimizer.init(params), nonfinite_step=jnp.full((), -1, jnp.int32))

    return build(params, variables), optimizer


def train_step(state: TrainState, batch: dict[str, jax.Array], *, config: ml_collections.ConfigDict, model,
               optimizer: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on one device's share of the batch (call it under shard_map over AXIS).

    A batch that carries an assignment (`gt_index` [B, A], `num_positives` and `iou_threshold`
    [B, G], as `AssignResult`) skips the assigner: scripts/benchmark_train.py times the step both ways.
    """
    grid = anchor_grid(config, batch["image"].shape[1:3])
    anchors, strides = jnp.asarray(grid.boxes), jnp.asarray(grid.anchor_strides)
    anchor_valid = anchor_valid_mask(grid.centers, batch["image_size"])
    if "gt_index" in batch:
        assignment = AssignResult(batch["gt_index"], batch["num_positives"], batch["iou_threshold"])
    else:
        assignment = build_assigner(config.assigner, grid)(anchor_valid, batch["boxes"], batch["box_valid"])

    def loss_fn(params):
        outputs, new_model_state = model.apply({"params": params, **state.model_state}, batch["image"], train=True,
                                               mutable=["batch_stats"])
        terms = losses.detection_losses(
            *outputs, anchors=anchors, anchor_strides=strides, anchor_valid=anchor_valid,
            gt_index=assignment.gt_index, gt_boxes=batch["boxes"], gt_labels=batch["labels"],
            regression=config.model.head.regression, use_centerness=config.model.head.use_centerness,
            axis_name=AXIS, **config.loss)
        return terms.total, (terms, new_model_state)

    grads, (terms, new_model_state) = jax.grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    model_state = {**state.model_state, **jax.lax.pmean(dict(new_model_state), AXIS)}

    finite = jax.lax.pmin(jnp.isfinite(terms.total).astype(jnp.int32), AXIS) > 0
    # Non-finite gradients or a too-large step both show up in the updated parameters.
    finite &= jnp.all(jnp.asarray([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    healthy = finite & (state.nonfinite_step < 0)
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(healthy, new, old))
    new_state = TrainState(
        step=state.step + 1,
        params=keep(params, state.params),
        model_state=keep(model_state, state.model_state),
        opt_state=keep(opt_state, state.opt_state),
        nonfinite_step=jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step))

    box_count = jax.lax.psum(jnp.sum(batch["box_valid"]), AXIS)
    per_box = functools.partial(_box_mean, valid=batch["box_valid"], count=box_count)
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


def _box_mean(value: jax.Array, *, valid: jax.Array, count: jax.Array) -> jax.Array:
    return jax.lax.psum(jnp.sum(jnp.where(valid, value, 0.0)), AXIS) / jnp.maximum(count, 1)


def eval_step(variables: dict, batch: dict[str, jax.Array], *, config: ml_collections.ConfigDict,
              model) -> dict[str, jax.Array]:
    """Detections of one device's images, in original-image pixels (call it under shard_map over AXIS)."""
    grid = anchor_grid(config, batch["image"].shape[1:3])
    anchors, strides = jnp.asarray(grid.boxes), jnp.asarray(grid.anchor_strides)
    class_logits, box_regression, centerness_logits = model.apply(variables, batch["image"], train=False)
    decoded = box_lib.decode_regression(config.model.head.regression, anchors, strides, box_regression)
    if not config.model.head.use_centerness:
        centerness_logits = jnp.full_like(centerness_logits, jnp.inf)  # sigmoid -> 1: rank by class only
    select = functools.partial(
        postprocess.select_detections, level_sizes=grid.level_sizes, score_threshold=config.eval.score_threshold,
        pre_nms_topk=config.eval.pre_nms_topk, iou_threshold=config.eval.nms_iou_threshold,
        max_detections=config.eval.max_detections)
    detections = jax.vmap(select)(jax.nn.sigmoid(class_logits), jax.nn.sigmoid(centerness_logits), decoded,
                                  anchor_valid_mask(grid.centers, batch["image_size"]), batch["image_size"],
                                  batch["scale"])
    return detections._asdict()


def compile_steps(config: ml_collections.ConfigDict, model, optimizer, mesh) -> tuple[Callable, Callable]:
    """jit(shard_map(step)) for training (state donated) and evaluation."""
    data = P(AXIS)
    train = jax.jit(jax.shard_map(
        functools.partial(train_step, config=config, model=model, optimizer=optimizer),
        mesh=mesh, in_specs=(P(), data), out_specs=(P(), P()), check_vma=False), donate_argnums=0)
    evaluate_fn = jax.jit(jax.shard_map(
        functools.partial(eval_step, config=config, model=model),
        mesh=mesh, in_specs=(P(), data), out_specs=data, check_vma=False))
    return train, evaluate_fn


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This host's batch -> global arrays sharded over AXIS (host p's rows go to its devices)."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def local_rows(array: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded array that live on this host, in this host's batch order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def predict_split(data_config: ml_collections.ConfigDict, variables: dict, eval_fn: Callable, mesh,
                  batch_per_host: int, *, horizontal_flip: bool = False, num_images_to_draw: int = 0,
                  draw_score_threshold: float = 0.3) -> tuple[pipeline.EvalData, dict[str, np.ndarray], list]:
    """This host's detections on the eval split of `data_config`, in original-image pixels.

    Returns:
      (the eval data, {"image_id" [N], "original_size" [N, 2], "boxes" [N, D, 4], "scores", "classes",
      "valid" [N, D]} for this host's N real examples in plan order, up to `num_images_to_draw` drawn images).
    """
    data = pipeline.eval_dataset(data_config, batch_per_host=batch_per_host, horizontal_flip=horizontal_flip)
    parts, drawn = [], []
    for batch in data.dataset.as_numpy_iterator():
        out = {k: local_rows(v) for k, v in eval_fn(variables, to_global(batch, mesh)).items()}
        valid = batch["example_valid"]
        parts.append({"image_id": batch["image_id"][valid], "original_size": batch["original_size"][valid],
                      **{k: out[k][valid] for k in ("boxes", "scores", "classes", "valid")}})
        if len(drawn) < num_images_to_draw and jax.process_index() == 0:
            drawn += visualise.draw_batch_detections(batch, out, num_images_to_draw - len(drawn),
                                                     score_threshold=draw_score_threshold)
    if not parts:
        raise ValueError(f"the evaluation split {data_config.eval_split!r} has no examples for this host")
    predictions = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if horizontal_flip:
        predictions["boxes"] = tta.unflip_boxes(predictions["boxes"], predictions["original_size"])
    return data, predictions, drawn


def run_evaluation(config: ml_collections.ConfigDict, variables: dict, eval_fn: Callable, mesh,
                   output_dir: str, *, ground_truth: dict | None = None) -> dict | None:
    """Detections over the eval split on every host (merged over the views of `config.eval.tta` when set);
    process 0 merges the hosts' detections and computes the COCO metrics.

    Returns (on process 0): {"metrics": the 12 numbers, "per_class": AP per category id,
    "table": Markdown, "images": drawn detections}; None on the other hosts.
    """
    per_host = config.eval.batch_per_device * jax.local_device_count()
    if config.eval.tta.min_sizes:
        view_predictions = []
        for view in tta.views(config):
            data, predictions, _ = predict_split(view.data_config, variables, eval_fn, mesh, per_host,
                                                 horizontal_flip=view.flip)
            view_predictions.append(predictions)
        predictions = {**view_predictions[0], **tta.merge_views(
            view_predictions, iou_threshold=config.eval.nms_iou_threshold, max_detections=config.eval.max_detections)}
        drawn = []  # nothing drawn with TTA: the views differ in size and only the merge is final
    else:
        data, predictions, drawn = predict_split(
            config.data, variables, eval_fn, mesh, per_host, num_images_to_draw=config.eval.num_images_to_draw,
            draw_score_threshold=config.eval.draw_score_threshold)
    detections = evaluate.detections_to_coco(
        predictions["image_id"], predictions["boxes"], predictions["scores"], predictions["classes"],
        predictions["valid"], predictions["original_size"], data.category_ids)
    evaluate.write_host_detections(output_dir, jax.process_index(), detections)
    multihost_utils.sync_global_devices("detections written")
    if jax.process_index() != 0:
        return None
    merged = evaluate.merge_host_detections(output_dir, jax.process_count())
    if ground_truth is None:
        ground_truth = (evaluate.load_ground_truth(config.eval.annotations_file) if config.eval.annotations_file
                        else evaluate.ground_truth_from_split(data.split))
    stats, per_class = evaluate.coco_metrics(ground_truth, merged, config.eval.evaluator)
    names = dict(zip(data.category_ids, data.split.builder.info.features["objects"]["label"].names))
    return {"metrics": stats, "per_class": {str(k): v for k, v in per_class.items()},
            "table": evaluate.format_table(stats, per_class, names), "images": drawn}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Errors for settings that would train silently wrong: explained, before anything compiles."""
    backbone = config.model.backbone
    if backbone.norm == "frozen_bn" and not backbone.pretrained:
        raise ValueError("config.model.backbone.norm='frozen_bn' freezes BatchNorm at ImageNet statistics: it needs "
                         "config.model.backbone.pretrained (convert torchvision weights with "
                         "scripts/convert_torchvision.py), or use norm='gn' or 'bn' to train from scratch.")
    num_classes = len(pipeline.open_split(config.data, config.data.train_split).category_ids)
    if num_classes != config.model.num_classes:
        raise ValueError(f"The dataset has {num_classes} categories but config.model.num_classes="
                         f"{config.model.num_classes}.")


def restore_training(config: ml_collections.ConfigDict, workdir: str | epath.Path, step: int | None = None, *,
                     require_checkpoint: bool = False) -> tuple:
    """(mesh, model, optimizer, checkpoints, state) of `workdir`.

    The state is checkpoint `step` (default: the latest), or a fresh one when the workdir has no
    checkpoint and `require_checkpoint` is False.
    """
    mesh = make_mesh()
    canvas = pipeline.canvases(config.data)[0]
    model = build_detector(config.model, anchor_grid(config, canvas).anchors_per_location, axis_name=AXIS)
    state, optimizer = create_train_state(config, model, canvas, mesh)
    checkpoints = checkpoint.TrainCheckpoints(epath.Path(workdir) / "checkpoints", config.train)
    if require_checkpoint and checkpoints.manager.latest_step() is None:
        raise checkpoint.CheckpointError(f"No checkpoint in {epath.Path(workdir) / 'checkpoints'}.")
    return mesh, model, optimizer, checkpoints, checkpoints.restore(state, step)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
    """Trains `config` in `workdir` (resuming from its latest checkpoint), evaluates, returns the final metrics."""
    workdir = epath.Path(workdir)
    global_batch = config.train.global_batch
    if global_batch % jax.device_count():
        raise ValueError(f"config.train.global_batch={global_batch} is not a multiple of the "
                         f"{jax.device_count()} devices.")
    check_config(config)
    mesh, model, optimizer, checkpoints, state = restore_training(config, workdir)
    start_step = int(state.step)
    train_fn, eval_fn = compile_steps(config, model, optimizer, mesh)

    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
    if start_step >= config.train.num_steps:  # a finished run: evaluate its final state again
        return evaluate_state(config, state, eval_fn, mesh, workdir, start_step, writer)
    if start_step == 0:
        writer.write_hparams(_flatten(config.to_dict()))
    num_steps = config.train.num_steps
    progress = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
    batches = pipeline.train_dataset(config.data, global_batch=global_batch, seed=config.seed,
                                     start_step=start_step).as_numpy_iterator()
    interval_metrics, interval_start, result = [], time.perf_counter(), None
    for step in range(start_step + 1, num_steps + 1):
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = train_fn(state, to_global(next(batches), mesh))
        interval_metrics.append(metrics)
        progress(step)
        last = step == num_steps
        if step % config.train.log_every == 0 or last:
            _raise_if_nonfinite(state)
            summary = {k: float(np.mean(v)) for k, v in jax.device_get(
                jax.tree.map(lambda *xs: jnp.stack(xs), *interval_metrics)).items()}
            elapsed = time.perf_counter() - interval_start
            summary["images_per_second"] = len(interval_metrics) * global_batch / elapsed
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
            result = evaluate_state(config, state, eval_fn, mesh, workdir, step, writer)
            interval_start = time.perf_counter()
    checkpoints.wait()
    writer.flush()
    return result


def evaluate_state(config, state: TrainState, eval_fn, mesh, workdir: epath.Path, step: int, writer) -> dict | None:
    """Evaluates, writes metrics, the detections JSON, PNGs and `metrics.json`; prints the table (process 0)."""
    output_dir = workdir / "eval" / f"step_{step}"
    result = run_evaluation(config, {"params": state.params, **state.model_state}, eval_fn, mesh, str(output_dir))
    if result is None:
        return None
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result["metrics"].items()})
    if result["images"]:
        writer.write_images(step, {"eval/detections": np.stack(result["images"])})
        visualise.write_pngs(result["images"], str(output_dir))
    summary = {"step": step, "metrics": result["metrics"], "per_class_ap": result["per_class"]}
    evaluate.save_json(str(output_dir / "metrics.json"), summary)
    evaluate.save_json(str(workdir / "metrics.json"), summary)
    print(f"COCO box metrics at step {step} (x100):\n{result['table']}", flush=True)
    return summary


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, step: int | None = None) -> dict | None:
    """Evaluates checkpoint `step` (default: the latest) of `workdir`."""
    workdir = epath.Path(workdir)
    mesh, model, optimizer, _, state = restore_training(config, workdir, step, require_checkpoint=True)
    _, eval_fn = compile_steps(config, model, optimizer, mesh)
    writer = metric_writers.create_default_writer(str(workdir), just_logging=jax.process_index() > 0)
    return evaluate_state(config, state, eval_fn, mesh, workdir, int(state.step), writer)


def _raise_if_nonfinite(state: TrainState) -> None:
    bad_step = int(jax.device_get(state.nonfinite_step))
    if bad_step >= 0:
        raise NonFiniteLossError(
            f"The loss or its gradients became non-finite at step {bad_step + 1}; the parameters were not "
            f"updated from then on. Lower config.optimizer.base_lr, set config.optimizer.clip_grad_norm, "
            f"or check the data of that step.")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat

