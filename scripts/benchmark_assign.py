r"""Benchmark: the jitted, batched ATSS assigners against the per-image designs of PyTorch codebases.

Same inputs for every implementation (a batch of images filling the canvas, COCO-like boxes), run
interleaved in one process after checking that all give the same assignment; medians and ratios:

  * jax grid-aware   - ``atss_assign_grid`` (``build_assigner``'s default): a star of locations
                       per box and level, what the train step runs;
  * jax full-matrix  - ``atss_assign`` vmapped: a top-k over every anchor of each level (the
                       readable reference);
  * numpy per image  - one image at a time, vectorised over its boxes with full [A, G] distance and
                       IoU matrices and a top-k per level (the official ATSS code's and
                       mmdetection's ATSSAssigner design), written here in numpy;
  * numpy per box    - one image and one box at a time (the loop reference of the tests).

Then each prediction-aware strategy (``--strategies``: tal, simota, ota, paa) on random predictions for the
same boxes, with the settings of the config's assigner section: jitted and batched against a per-image design
of a PyTorch codebase, a Python loop over the images as its heads run it, interleaved, with the share of
anchors on which they agree and the positives per box. The per-image designs (``PER_IMAGE_DESIGNS``):

  * tal    - mmdetection 3.3.0's TaskAlignedAssigner;
  * simota - mmdetection 3.3.0's SimOTAAssigner;
  * ota    - the official OTA code's (Megvii-BaseDetection/OTA): the ``[G + 1, A]`` cost matrix of an image,
             vectorised over boxes and anchors, and a loop of log-domain Sinkhorn steps on it, in numpy;
  * paa    - mmdetection's PAAHead (``paa_reassign``): the initial assignment and scores vectorised per image,
             then a loop over the boxes with a two-Gaussian EM each, in numpy (sklearn's GaussianMixture is
             not installed; the EM starts where mmdetection starts sklearn's);
the last two from tests/reference_prediction_assigners.py, which the tests check against ours.

Usage (from the repository root):
  python -m scripts.benchmark_assign --config=configs/base.py --batch=16 --num_boxes=100
  python -m scripts.benchmark_assign --config=configs/base.py --config.assigner.topk=7 --nine_anchors
"""

from __future__ import annotations

import json
import statistics
import time
import tracemalloc
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from atss_jax.anchors import AnchorGrid, anchor_valid_mask, make_anchor_grid
from atss_jax.assigners import PREDICTION_AWARE, Predictions, atss_grid, build_assigner
from tests.prediction_cases import full_gt_index, mmdet_inputs
from tests.reference_assigners import atss_reference
from tests.reference_prediction_assigners import ota_per_image, paa_per_image

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Experiment config.")
_BATCH = flags.DEFINE_integer("batch", 16, "Images per batch.")
_NUM_BOXES = flags.DEFINE_integer("num_boxes", 100, "Valid boxes per image (= max_boxes here).")
_CANVAS = flags.DEFINE_list("canvas", None, "height,width; default: config.data.canvas.")
_NINE = flags.DEFINE_bool("nine_anchors", False, "9 anchors per location (3 scales x 3 ratios).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions of each implementation.")
_LOOP_IMAGES = flags.DEFINE_integer(
    "loop_images", 2, "Images timed for the per-box loop (scaled to the batch); 0 skips it."
)
_JSON = flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
_STRATEGIES = flags.DEFINE_list("strategies", list(PREDICTION_AWARE), "Prediction-aware assigners to time too.")


def coco_like_boxes(rng: np.random.Generator, batch: int, num_boxes: int, canvas: tuple[int, int]) -> np.ndarray:
    """``[B, G, 4]`` float32 boxes inside the canvas, sides log-uniform from 4 px to the canvas."""
    height, width = canvas
    size = np.exp(rng.uniform(np.log(4.0), np.log(min(canvas)), (batch, num_boxes)))
    ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3), (batch, num_boxes)))
    wh = np.stack([size / np.sqrt(ratio), size * np.sqrt(ratio)], axis=-1)
    wh = np.minimum(wh, [width, height])
    corner = rng.uniform(0, 1, (batch, num_boxes, 2)) * ([width, height] - wh)
    return np.concatenate([corner, corner + wh], axis=-1).astype(np.float32)


def atss_per_image_numpy(
    grid: AnchorGrid, anchor_valid: np.ndarray, gt_boxes: np.ndarray, topk: int, center_eps: float
) -> np.ndarray:
    """One image, vectorised over its boxes: the design of the official ATSS code and mmdetection.

    ``anchor_valid [A] bool, gt_boxes [G, 4] float32 -> gt_index [A] int``.
    """
    anchors, centers = grid.boxes, grid.centers
    # [G, A] layout so that the per-level top-k runs along contiguous rows.
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    inter_w = np.minimum(gt_boxes[:, 2:3], anchors[:, 2]) - np.maximum(gt_boxes[:, 0:1], anchors[:, 0])
    inter_h = np.minimum(gt_boxes[:, 3:4], anchors[:, 3]) - np.maximum(gt_boxes[:, 1:2], anchors[:, 1])
    inter = np.clip(inter_w, 0, None) * np.clip(inter_h, 0, None)
    area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    area_g = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    ious = inter / (area_a[None, :] + area_g[:, None] - inter)  # [G, A]
    dx = gt_centers[:, 0:1] - centers[:, 0]
    dy = gt_centers[:, 1:2] - centers[:, 1]
    distances = np.sqrt(dx * dx + dy * dy)  # [G, A]
    distances[:, ~anchor_valid] = np.inf
    candidates, start = [], 0
    for size in grid.level_sizes:
        k = min(topk * grid.anchors_per_location, size)
        part = np.argpartition(distances[:, start : start + size], k - 1, axis=1)[:, :k]
        candidates.append(part + start)
        start += size
    candidates = np.concatenate(candidates, axis=1)  # [G, K]
    box_ids = np.arange(len(gt_boxes))[:, None]
    candidate_ious = ious[box_ids, candidates]
    threshold = candidate_ious.mean(1, keepdims=True) + candidate_ious.std(1, ddof=1, keepdims=True)
    cx, cy = centers[candidates, 0], centers[candidates, 1]
    margin = np.minimum.reduce(
        [cx - gt_boxes[:, 0:1], cy - gt_boxes[:, 1:2], gt_boxes[:, 2:3] - cx, gt_boxes[:, 3:4] - cy]
    )
    positive = (candidate_ious >= threshold) & (margin > center_eps) & anchor_valid[candidates]
    claimed = np.full(ious.shape, -np.inf, np.float32)
    claimed[np.broadcast_to(box_ids, positive.shape)[positive], candidates[positive]] = candidate_ious[positive]
    return np.where(claimed.max(0) > -np.inf, claimed.argmax(0), -1)


# The per-image design each prediction-aware strategy is timed against (see _per_image_assigner).
PER_IMAGE_DESIGNS = {
    "tal": "mmdet TaskAlignedAssigner",
    "simota": "mmdet SimOTAAssigner",
    "ota": "numpy OTA (official design)",
    "paa": "numpy PAA (mmdet paa_reassign design)",
}


def _per_image_assigner(name: str, settings: ml_collections.ConfigDict) -> Callable[..., np.ndarray]:
    """The per-image design of strategy ``name`` (``PER_IMAGE_DESIGNS``) as
    ``(grid, anchor_valid [A], gt_boxes [G, 4], gt_labels [G], scores [A, C], pred_boxes [A, 4]) -> gt_index [A]``,
    with the settings of ``settings`` (the config's assigner section): mmdetection 3.3.0's assigner where it has one,
    else the numpy design of tests/reference_prediction_assigners.py."""
    if name == "ota":
        return lambda grid, anchor_valid, gt_boxes, gt_labels, scores, pred_boxes: ota_per_image(
            grid.boxes, grid.anchor_strides, anchor_valid, gt_boxes, gt_labels, scores, pred_boxes,
            center_radius=settings.ota_center_radius, candidate_topk=settings.ota_candidate_topk,
            iou_weight=settings.ota_iou_weight, epsilon=settings.ota_epsilon, iterations=settings.ota_iterations,
            focal_alpha=settings.cost_focal_alpha, focal_gamma=settings.cost_focal_gamma)
    if name == "paa":
        return lambda grid, anchor_valid, gt_boxes, gt_labels, scores, pred_boxes: paa_per_image(
            grid.boxes, grid.level_sizes, anchor_valid, gt_boxes, gt_labels, scores, pred_boxes,
            topk=settings.paa_topk, box_weight=settings.paa_box_weight, em_iterations=settings.paa_em_iterations,
            focal_alpha=settings.cost_focal_alpha, focal_gamma=settings.cost_focal_gamma)
    from scripts import mmdet_peer

    mmdet_peer.import_mmdet()
    from mmdet.models.task_modules.assigners import SimOTAAssigner, TaskAlignedAssigner

    def assign(grid, anchor_valid, gt_boxes, gt_labels, scores, pred_boxes):
        gt_valid = np.ones(len(gt_boxes), bool)
        if name == "tal":
            priors = None
        else:  # YOLOX's points and strides
            strides = np.asarray(grid.anchor_strides, np.float32)[:, None]
            priors = np.concatenate([grid.centers, strides, strides], -1).astype(np.float32)
        pred, gts, inside = mmdet_inputs(grid.boxes, anchor_valid, gt_boxes, gt_valid, gt_labels, scores, pred_boxes,
                                         priors=priors)
        if name == "tal":
            result = TaskAlignedAssigner(topk=settings.tal_topk).assign(pred, gts, alpha=settings.tal_alpha,
                                                                        beta=settings.tal_beta)
        else:
            result = SimOTAAssigner(center_radius=settings.simota_center_radius,
                                    candidate_topk=settings.simota_candidate_topk,
                                    iou_weight=settings.simota_iou_weight,
                                    cls_weight=settings.simota_cls_weight).assign(pred, gts)
        return full_gt_index(result.gt_inds.numpy(), inside, len(grid.boxes))

    return assign


def _time_strategies(config, grid: AnchorGrid, anchor_valid: np.ndarray, gt_boxes: np.ndarray,
                     gt_valid: np.ndarray) -> list[dict]:
    """Each strategy of ``--strategies``: jax batched against its per-image design, interleaved; one row each."""
    rng = np.random.default_rng(1)
    batch, num_anchors = anchor_valid.shape
    num_classes = config.model.num_classes
    gt_labels = rng.integers(0, num_classes, gt_valid.shape).astype(np.int32)
    scores = rng.uniform(0.0, 1.0, (batch, num_anchors, num_classes)).astype(np.float32)
    # Predicted boxes near the anchors: corners moved by a quarter of the anchor's size.
    jitter = rng.normal(0.0, 0.25, (batch, num_anchors, 4)) * np.tile(grid.boxes[:, 2:] - grid.boxes[:, :2], 2)
    corners = (grid.boxes + jitter).reshape(batch, num_anchors, 2, 2)
    pred_boxes = np.concatenate([corners.min(axis=2), corners.max(axis=2)], -1).astype(np.float32)
    rows = []
    for name in _STRATEGIES.value:
        if name not in PREDICTION_AWARE:
            raise SystemExit(f"--strategies: {name!r} is not one of {PREDICTION_AWARE}")
        with config.unlocked():
            config.assigner.name, config.assigner.warmup_assigner_steps = name, 0
        args = jax.device_put((anchor_valid, gt_boxes, gt_valid, gt_labels, Predictions(scores, pred_boxes), 0))
        start = time.perf_counter()
        compiled = jax.jit(build_assigner(config.assigner, grid)).lower(*args).compile()
        compile_s = time.perf_counter() - start
        soft = compiled(*args)
        jax_index = np.asarray(soft.result.gt_index)
        per_image = _per_image_assigner(name, config.assigner)

        def run_per_image(per_image=per_image):
            return np.stack([per_image(grid, anchor_valid[i], gt_boxes[i], gt_labels[i], scores[i], pred_boxes[i])
                             for i in range(batch)])

        agreement = float(np.mean(run_per_image() == jax_index))
        jax_times, per_image_times = [], []
        for _ in range(_REPEATS.value):
            jax_times.append(_time(lambda args=args, compiled=compiled: compiled(*args).result.gt_index))
            per_image_times.append(_time(run_per_image))
        rows.append(dict(
            strategy=name, jax_s=statistics.median(jax_times), compile_s=compile_s,
            per_image_s=statistics.median(per_image_times), per_image_design=PER_IMAGE_DESIGNS[name],
            agreement=agreement, positives_per_box=float(np.mean(np.asarray(soft.result.num_positives)[gt_valid]))))
    print(f"\nPrediction-aware assigners: the same batch, {num_classes} classes, random scores, predicted boxes "
          "near the anchors; jax batched against a per-image design, interleaved")
    print(f"{'strategy':<10} {'jax ms':>10} {'per-image ms':>13} {'x jax':>8} {'agree':>8} {'pos/box':>8} "
          f"{'compile s':>10}  per-image design")
    for row in rows:
        per_image_ms = row["per_image_s"] * 1e3
        print(f"{row['strategy']:<10} {row['jax_s'] * 1e3:>10.1f} {per_image_ms:>13.1f} "
              f"{row['per_image_s'] / row['jax_s']:>7.1f}x {row['agreement']:>8.4f} {row['positives_per_box']:>8.2f} "
              f"{row['compile_s']:>10.2f}  {row['per_image_design']}")
    return rows


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def _cost(compiled: jax.stages.Compiled, key: str) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX returned one dict per device
        analysis = analysis[0] if analysis else {}
    return (analysis or {}).get(key)


def _copy_bandwidth() -> float:
    """Bytes per second of a large numpy copy (read + write), this machine's memory speed."""
    source = np.ones(64 * 2**20 // 4, np.float32)
    target = np.empty_like(source)
    best = min(_time(lambda: np.copyto(target, source)) for _ in range(5))
    return 2 * source.nbytes / best


def _numpy_peak_bytes(fn: Callable[[], object]) -> int:
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    canvas = tuple(int(v) for v in _CANVAS.value) if _CANVAS.value else tuple(config.data.canvas)
    anchor_config = config.anchors
    scales, ratios = tuple(anchor_config.scales), tuple(anchor_config.aspect_ratios)
    if _NINE.value:
        scales, ratios = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)), (0.5, 1.0, 2.0)
    grid = make_anchor_grid(canvas, anchor_config.strides, anchor_config.octave_base_scale, scales, ratios)
    batch, num_boxes, topk = _BATCH.value, _NUM_BOXES.value, config.assigner.topk
    gt_boxes = coco_like_boxes(np.random.default_rng(0), batch, num_boxes, canvas)
    gt_valid = np.ones((batch, num_boxes), bool)
    image_size = np.tile(np.asarray(canvas, np.int32), (batch, 1))
    anchor_valid = np.asarray(anchor_valid_mask(grid.centers, image_size))

    center_eps = config.assigner.center_eps
    assigners = {}
    for name, implementation in (("jax grid-aware", "grid"), ("jax full-matrix", "full_matrix")):
        with config.unlocked():
            config.assigner.name, config.assigner.atss_implementation = "atss", implementation
        assigners[name] = build_assigner(config.assigner, grid)
    # The cond reserves the fallback's buffers (never touched on the fast path): also measure the
    # grid path alone, without the fallback.
    assigners["grid path"] = jax.vmap(lambda v, b, g: atss_grid._assign_image(grid, v, b, g, topk, center_eps)[0])
    device_args = jax.device_put((anchor_valid, gt_boxes, gt_valid))
    compiled, compile_s, device_bytes, accessed_bytes = {}, {}, {}, {}
    for name, fn in assigners.items():
        start = time.perf_counter()
        compiled[name] = jax.jit(fn).lower(*device_args).compile()
        compile_s[name] = time.perf_counter() - start
        memory = compiled[name].memory_analysis()
        device_bytes[name] = memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
        accessed_bytes[name] = _cost(compiled[name], "bytes accessed")
    path_bytes, path_accessed = device_bytes.pop("grid path"), accessed_bytes.pop("grid path")
    compile_s.pop("grid path")

    def run_grid():
        return compiled["jax grid-aware"](*device_args).gt_index

    def run_full():
        return compiled["jax full-matrix"](*device_args).gt_index

    def run_per_image():
        return np.stack(
            [atss_per_image_numpy(grid, anchor_valid[i], gt_boxes[i], topk, center_eps) for i in range(batch)]
        )

    loop_images = min(_LOOP_IMAGES.value, batch)

    def run_per_box():
        return [
            atss_reference(
                grid.boxes,
                anchor_valid[i],
                gt_boxes[i],
                gt_valid[i],
                grid.level_sizes,
                topk,
                grid.anchors_per_location,
                center_eps,
            )[0]
            for i in range(loop_images)
        ]

    # Same answer from all before anything is timed.
    jax_index = np.asarray(run_grid())
    np.testing.assert_array_equal(np.asarray(run_full()), jax_index)
    mismatched = np.mean(run_per_image() != jax_index)
    # argpartition breaks exact distance ties arbitrarily, as torch.topk does; only those may differ.
    assert mismatched < 1e-3, f"numpy per-image design disagrees on {mismatched:.3%} of anchors"
    if loop_images:
        np.testing.assert_array_equal(np.stack(run_per_box()), jax_index[:loop_images])

    names = ("jax grid-aware", "jax full-matrix", "numpy per image", "numpy per box")
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(_REPEATS.value):  # interleaved, so drifts in machine load hit all alike
        times["jax grid-aware"].append(_time(run_grid))
        times["jax full-matrix"].append(_time(run_full))
        times["numpy per image"].append(_time(run_per_image))
        if loop_images:
            times["numpy per box"].append(_time(run_per_box) * batch / loop_images)
    # Interleaved, each jax call follows seconds of numpy work and starts with cold caches and a sleeping
    # thread pool; back to back is what a train step, called over and over, sees.
    back_to_back = {
        name: statistics.median(_time(run) for _ in range(20))
        for name, run in (("jax grid-aware", run_grid), ("jax full-matrix", run_full))
    }
    peaks = {
        **device_bytes,
        "numpy per image": _numpy_peak_bytes(
            lambda: atss_per_image_numpy(grid, anchor_valid[0], gt_boxes[0], topk, center_eps)
        ),
        "numpy per box": _numpy_peak_bytes(
            lambda: atss_reference(
                grid.boxes,
                anchor_valid[0],
                gt_boxes[0],
                gt_valid[0],
                grid.level_sizes,
                topk,
                grid.anchors_per_location,
                center_eps,
            )
        ),
    }

    grid_median = statistics.median(times["jax grid-aware"])
    # The least any implementation must move: read the valid mask and the boxes, write gt_index.
    floor_bytes = anchor_valid.nbytes + gt_boxes.nbytes + gt_valid.nbytes + anchor_valid.size * 4
    bandwidth = _copy_bandwidth()
    print(
        f"\nATSS assignment: batch {batch}, canvas {canvas[0]}x{canvas[1]}, {grid.num_anchors} anchors "
        f"({grid.anchors_per_location}/location), {num_boxes} boxes/image, k={topk}, "
        f"{jax.devices()[0].device_kind}, {_REPEATS.value} interleaved repeats"
    )
    header = ("implementation", "median ms", "x grid", "back-to-back ms", "peak MiB", "XLA MiB moved", "compile s")
    print(
        f"{header[0]:<16} {header[1]:>10} {header[2]:>8} {header[3]:>16} {header[4]:>9} {header[5]:>14} "
        f"{header[6]:>10}"
    )
    rows = []
    for name, samples in times.items():
        if not samples:
            continue
        median = statistics.median(samples)
        moved = accessed_bytes.get(name)
        rows.append(
            dict(
                name=name,
                median_s=median,
                ratio=median / grid_median,
                peak_bytes=peaks[name],
                bytes_accessed=moved,
                compile_s=compile_s.get(name),
                back_to_back_s=back_to_back.get(name),
            )
        )
        moved_text = f"{moved / 2**20:.1f}" if moved else "-"
        compile_text = f"{compile_s[name]:.2f}" if name in compile_s else "-"
        back_text = f"{back_to_back[name] * 1e3:.1f}" if name in back_to_back else "-"
        print(
            f"{name:<16} {median * 1e3:>10.1f} {median / grid_median:>7.1f}x {back_text:>16} "
            f"{peaks[name] / 2**20:>9.1f} {moved_text:>14} {compile_text:>10}"
        )
    print(
        f"grid path without the fallback: peak {path_bytes / 2**20:.1f} MiB, "
        f"XLA moves {(path_accessed or 0) / 2**20:.1f} MiB"
    )
    floor_s = floor_bytes / bandwidth
    print(
        f"floor: {floor_bytes / 2**20:.1f} MiB in+out at {bandwidth / 2**30:.1f} GiB/s (measured copy) = "
        f"{floor_s * 1e3:.2f} ms; grid-aware is {grid_median / floor_s:.0f}x the floor"
    )
    if loop_images and loop_images < batch:
        print(f"(numpy per box: {loop_images} of {batch} images timed, scaled; numpy peaks: one image)")
    strategies = _time_strategies(config, grid, anchor_valid, gt_boxes, gt_valid) if _STRATEGIES.value else []
    if _JSON.value:
        summary = dict(batch=batch, canvas=canvas, anchors=grid.num_anchors, boxes=num_boxes, topk=topk)
        summary.update(rows=rows, floor_bytes=floor_bytes, copy_bandwidth=bandwidth, floor_s=floor_s)
        summary.update(grid_path_peak_bytes=path_bytes, grid_path_bytes_accessed=path_accessed, strategies=strategies)
        epath.Path(_JSON.value).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
