"""The evaluator: COCO box metrics on a config's evaluation split, built once, run for every evaluation.

    evaluator = Evaluator(config, model, mesh)
    result = evaluator.run(variables, output_dir)   # on every host; the result on process 0, None elsewhere

Every host runs batched inference on its share of the split (each view of ``config.eval.tta``, merged
by NMS or box voting, when enabled), writes its detections to ``output_dir``, and process 0 merges the hosts'
files and scores them against the ground truth. The result (one set of keys, also the keys of
``metrics.json`` beside ``step``):

    metrics        the 12 COCO numbers by name (``coco_eval.METRIC_NAMES``), fractions in [0, 1]
    per_class_ap   AP per category id (string keys, as JSON has them)
    table          the 12 numbers and the per-class AP as Markdown tables (x100)
    images         up to ``config.eval.num_images_to_draw`` images with their detections drawn
                   ([H, W, 3] uint8; none with test-time augmentation, whose views differ in size)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from clu import metric_writers
from etils import epath
from jax.experimental import multihost_utils

from atss_jax import checkpoint, coco_eval, inference, parallel, preemption, tta, visualise
from atss_jax.anchors import anchors_per_location
from atss_jax.data import pipeline, transforms
from atss_jax.models.detector import abstract_variables, build_detector

# What evaluation writes: per evaluation a folder of the workdir, and the latest summary at its top.
EVAL_DIR = "eval"
METRICS_FILE = "metrics.json"


class Evaluator:
    """COCO evaluation of one config: the compiled inference step, the views, the ground truth."""

    def __init__(self, config: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh,
                 sigterm: preemption.SigtermFlag | None = None):
        """``sigterm``: a preemption request that stops the evaluation before its next batch (one process
        only: hosts of a multi-host job would stop at different batches, so there they finish it)."""
        self.config = config
        self.mesh = mesh
        self.sigterm = sigterm if jax.process_count() == 1 else None
        # With test-time augmentation every view, even a single one, goes through the merge.
        self.merge_views = bool(config.eval.tta.enabled)
        self.views = tta.views(config)
        self.batch_per_host = config.eval.batch_per_device * jax.local_device_count()
        # check_vma=False: eval_step is written per device, as train_step; the varying-axes check would
        # reject NMS's while_loop, whose carry starts device-invariant and becomes per-device.
        self._detect = jax.jit(jax.shard_map(
            functools.partial(inference.eval_step, config=config, model=model), mesh=mesh,
            in_specs=(parallel.REPLICATED_SPEC, parallel.BATCH_SPEC), out_specs=parallel.BATCH_SPEC,
            check_vma=False))
        self._ground_truth = None

    def predict(self, variables: dict, view: tta.View,
                num_images_to_draw: int = 0) -> tuple[pipeline.EvalData, dict[str, np.ndarray], list[np.ndarray]]:
        """This host's detections of one view, in original-image pixels (mirrored views mapped back).

        Returns:
          (the eval data, {"image_id" [N], "original_size" [N, 2], "scale" [N] (the view's resize), "boxes"
          [N, D, 4], "scores", "classes", "valid" [N, D]} for this host's N real examples in plan order, up to
          ``num_images_to_draw`` drawn images).
        """
        data = pipeline.eval_dataset(view.data_config, batch_per_host=self.batch_per_host, horizontal_flip=view.flip)
        parts, drawn = [], []
        for batch in data.dataset.as_numpy_iterator():
            if self.sigterm is not None and self.sigterm.requested:
                raise preemption.Preempted("SIGTERM (preemption) stopped the evaluation before it wrote anything: "
                                           "run the same command again to evaluate.")
            detections = self._detect(variables, parallel.to_global(batch, self.mesh))
            out = {k: parallel.local_rows(v) for k, v in detections.items()}
            valid = batch["example_valid"]
            parts.append({"image_id": batch["image_id"][valid], "original_size": batch["original_size"][valid],
                          "scale": batch["scale"][valid],
                          **{k: out[k][valid] for k in ("boxes", "scores", "classes", "valid")}})
            if len(drawn) < num_images_to_draw and parallel.is_main_process():
                drawn += visualise.draw_batch_detections(batch, out, num_images_to_draw - len(drawn),
                                                         score_threshold=self.config.eval.draw_score_threshold)
        if not parts:
            raise ValueError(f"the evaluation split {view.data_config.eval_split!r} has no examples for this host")
        predictions = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if view.flip:
            predictions["boxes"] = tta.unflip_boxes(predictions["boxes"], predictions["original_size"])
        return data, predictions, drawn

    def run(self, variables: dict, output_dir: str | epath.Path) -> dict | None:
        """Evaluates ``variables`` (replicated over the mesh); every host must call it.

        Returns:
          On process 0 the result described in the module docstring; None on the other hosts.
        """
        eval_config = self.config.eval
        if self.merge_views:
            view_predictions = []
            for view in self.views:
                data, predictions, _ = self.predict(variables, view)
                view_predictions.append(predictions)
            predictions = {**view_predictions[0], **tta.merge_views(view_predictions, self.views, eval_config)}
            drawn = []
        else:
            data, predictions, drawn = self.predict(variables, self.views[0], eval_config.num_images_to_draw)
        detections = coco_eval.detections_to_coco(
            predictions["image_id"], predictions["boxes"], predictions["scores"], predictions["classes"],
            predictions["valid"], predictions["original_size"], data.category_ids)
        coco_eval.write_host_detections(str(output_dir), jax.process_index(), detections)
        multihost_utils.sync_global_devices("detections written")
        if not parallel.is_main_process():
            return None
        merged = coco_eval.merge_host_detections(str(output_dir), jax.process_count())
        stats, per_class = coco_eval.coco_metrics(self.ground_truth(data.split), merged, eval_config.evaluator)
        names = dict(zip(data.category_ids, data.split.builder.info.features["objects"]["label"].names))
        return {"metrics": stats, "per_class_ap": {str(k): v for k, v in per_class.items()},
                "table": coco_eval.format_table(stats, per_class, names), "images": drawn}

    def ground_truth(self, split: pipeline.Split) -> dict:
        """The COCO ground truth (read once): ``config.eval.annotations_file`` when set, else the split's
        annotation JSON recorded at prepare time, else built from the split (`coco_eval.ground_truth`)."""
        if self._ground_truth is None:
            self._ground_truth = coco_eval.ground_truth(split, self.config.eval.annotations_file)
        return self._ground_truth


def step_dir(workdir: str | epath.Path, step: int) -> epath.Path:
    """Where the evaluation of checkpoint ``step`` writes its detections, PNGs and metrics."""
    return epath.Path(workdir) / EVAL_DIR / f"step_{step}"


def write_result(result: dict | None, workdir: str | epath.Path, step: int,
                 writer: metric_writers.MetricWriter) -> dict | None:
    """Writes one evaluation (process 0; a no-op elsewhere): TensorBoard scalars and images, PNGs,
    ``metrics.json`` in ``step_dir`` and at the top of the workdir; prints the table.

    Returns:
      The summary written: {"step", "metrics", "per_class_ap"}; None on the other hosts.
    """
    if result is None:
        return None
    output_dir = step_dir(workdir, step)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in result["metrics"].items()})
    if result["images"]:
        writer.write_images(step, {"eval/detections": np.stack(result["images"])})
        visualise.write_pngs(result["images"], str(output_dir))
    summary = {"step": step, "metrics": result["metrics"], "per_class_ap": result["per_class_ap"]}
    coco_eval.save_json(output_dir / METRICS_FILE, summary)
    coco_eval.save_json(epath.Path(workdir) / METRICS_FILE, summary)
    print(f"COCO box metrics at step {step} (x100):\n{result['table']}", flush=True)
    return summary


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str | epath.Path,
                        step: int | None = None) -> dict | None:
    """Evaluates checkpoint ``step`` (default: the latest) of ``workdir`` and writes the result.

    Restores the model variables only: no optimiser, no pretrained weights. SIGTERM stops it before the next
    batch with `preemption.Preempted`; run again, it evaluates the checkpoint from the start (each host's
    detections file is rewritten whole, never appended to).
    """
    sigterm = preemption.SigtermFlag().install()
    mesh = parallel.make_mesh()
    canvas = transforms.canvases(config.data)[0]
    model = build_detector(config.model, anchors_per_location(config.anchors), axis_name=parallel.AXIS)
    replicated = jax.sharding.NamedSharding(mesh, parallel.REPLICATED_SPEC)
    restored = checkpoint.restore_variables(workdir, abstract_variables(model, canvas, replicated), step)
    print(f"Evaluating checkpoint step {restored.step} of {workdir}.", flush=True)
    result = Evaluator(config, model, mesh, sigterm).run(restored.variables, step_dir(workdir, restored.step))
    writer = metric_writers.create_default_writer(str(workdir), just_logging=not parallel.is_main_process())
    return write_result(result, workdir, restored.step, writer)
