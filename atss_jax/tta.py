"""Test-time augmentation: the official ``TEST.BBOX_AUG`` (``atss_core/engine/bbox_aug_vote.py``).

The views of ``config.eval.tta`` (when ``enabled``), in the official order:

* the plain evaluation (``config.data``: its short side, long-side cap and canvas), then the same mirrored
  with ``flip`` (``H_FLIP``);
* per short side ``s`` of ``min_sizes`` (``SCALES``): ``s`` with the long side capped at ``max_size``
  (``MAX_SIZE``), or at ``config.data.max_size`` when ``s`` is below ``config.data.eval_min_size`` (the
  official vote path: ``MAX_SIZE_TEST`` below 800); then the same mirrored with ``scale_flip``
  (``SCALE_H_FLIP``). Its canvas is ``(s, cap)`` rounded up to multiples of 32, so every image gets exactly
  the official size whatever its aspect ratio (with aspect-ratio buckets, the transposed canvas takes the
  portrait images). Each such canvas is one more compile.

Each view runs the plain inference (per view: score threshold, top-k per level, class-wise NMS and
``config.eval.max_detections``, as the official post-processor does under box voting). Its detections
come back in original pixels, mirrored ones mirrored back. A scale view with a ``size_ranges`` entry
``(low, high)`` (``SCALE_RANGES``) then drops detections whose area in that view's pixels is not strictly
between ``low**2`` and ``high**2`` (the official ``remove_boxes``). Per image, the candidates of all views
merge by ``merge``: "nms" (the class-wise NMS of inference at ``config.eval.nms_iou_threshold``), or the
official box voting, "vote" or "soft-vote" (``postprocess.box_vote``, ``MERGE_TYPE`` with ``VOTE_TH``), and
the best ``max_detections`` are kept (the official vote path keeps ``MODEL.ATSS.PRE_NMS_TOP_N``, 1000, and
keeps ties at the cut too; here exactly that many). The merge is jitted with fixed shapes: ``V x
max_detections`` candidates per image in, ``max_detections`` out.

Coordinates are continuous (no "+1"); the official code counts inclusive pixels (a box ``x2 - x1 + 1``
wide) and mirrors as ``w - 1 - x``, the same geometry one pixel over, so areas and overlaps agree. It
merges in the plain view's pixels, here original pixels: overlaps do not depend on the scale.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from atss_jax import errors, postprocess

MERGES = ("nms", "vote", "soft-vote")


@dataclasses.dataclass(frozen=True)
class View:
    """One evaluation pass.

    Attributes:
      short_side, max_size: the resize of this view.
      flip: whether images are mirrored.
      size_range: (low, high) exclusive bounds on sqrt(box area) in this view's pixels; None keeps all.
      data_config: the data config to read the split with.
    """

    short_side: int
    max_size: int
    flip: bool
    size_range: tuple[float, float] | None
    data_config: ml_collections.ConfigDict


def _round_up_32(side: float) -> int:
    return 32 * math.ceil(side / 32)


def views(config: ml_collections.ConfigDict) -> list[View]:
    """The views of ``config.eval.tta`` in the official order; the plain evaluation alone when not enabled."""
    tta, data = config.eval.tta, config.data
    plain = View(int(data.eval_min_size), int(data.max_size), False, None, data)
    if not tta.enabled:
        return [plain]
    if tta.merge not in MERGES:
        raise errors.ConfigError(f"config.eval.tta.merge={tta.merge!r} is not one of {MERGES}")
    if tta.size_ranges and len(tta.size_ranges) != len(tta.min_sizes):
        raise errors.ConfigError(f"config.eval.tta.size_ranges has {len(tta.size_ranges)} entries for "
                                 f"{len(tta.min_sizes)} min_sizes: give one (low, high) per short side, or none")
    if tta.max_size <= 0 or tta.max_detections <= 0:
        raise errors.ConfigError(f"config.eval.tta.max_size={tta.max_size} and max_detections={tta.max_detections} "
                                 "must be positive")
    result = [plain] + ([View(plain.short_side, plain.max_size, True, None, data)] if tta.flip else [])
    for index, short_side in enumerate(tta.min_sizes):
        if short_side <= 0:
            raise errors.ConfigError(f"config.eval.tta.min_sizes has {short_side}: short sides must be positive")
        size_range = None
        if tta.size_ranges:
            low, high = (float(bound) for bound in tta.size_ranges[index])
            if not 0 <= low < high:
                raise errors.ConfigError(f"config.eval.tta.size_ranges[{index}]={tuple(tta.size_ranges[index])} needs "
                                         "0 <= low < high")
            size_range = (low, high)
        max_size = int(data.max_size if short_side < data.eval_min_size else tta.max_size)
        canvas = (_round_up_32(min(short_side, max_size)), _round_up_32(max_size))
        if data.aspect_ratio_buckets and canvas[0] == canvas[1]:
            raise errors.ConfigError(f"the test-time augmentation view at short side {short_side} (long side at most "
                                     f"{max_size}) has a square canvas {canvas}, which aspect-ratio buckets cannot use")
        data_config = ml_collections.ConfigDict(data.to_dict())
        data_config.eval_min_size = int(short_side)
        data_config.max_size = max_size
        data_config.canvas = canvas
        for flip in (False, True) if tta.scale_flip else (False,):
            result.append(View(int(short_side), max_size, flip, size_range, data_config))
    return result


def unflip_boxes(boxes: np.ndarray, original_sizes: np.ndarray) -> np.ndarray:
    """Boxes found in mirrored images -> the original images.

    Args:
      boxes: ``[N, D, 4]`` xyxy original pixels of the mirrored images.
      original_sizes: ``[N, 2]`` (height, width).
    """
    width = original_sizes[:, 1].astype(boxes.dtype)[:, None]
    x1, y1, x2, y2 = np.moveaxis(boxes, -1, 0)
    return np.stack([width - x2, y1, width - x1, y2], axis=-1)


def in_size_range(boxes: np.ndarray, scales: np.ndarray, size_range: tuple[float, float]) -> np.ndarray:
    """Whether each box's area in its view's pixels lies strictly between ``low**2`` and ``high**2``.

    Args:
      boxes: ``[N, D, 4]`` xyxy original pixels.
      scales: ``[N]`` the view's resize scale of each image (view pixels / original pixels).
      size_range: (low, high).

    Returns:
      ``[N, D]`` bool.
    """
    low, high = size_range
    wh = (boxes[..., 2:] - boxes[..., :2]) * scales[:, None, None]
    area = wh[..., 0] * wh[..., 1]
    return (area > low * low) & (area < high * high)


@functools.partial(jax.jit, static_argnames=("merge", "nms_iou_threshold", "vote_threshold", "soft_score_threshold",
                                             "max_detections"))
def _merge_chunk(boxes, scores, classes, valid, *, merge: str, nms_iou_threshold: float, vote_threshold: float,
                 soft_score_threshold: float, max_detections: int):
    def one_image(image_boxes, image_scores, image_classes, image_valid):
        if merge == "nms":
            keep, keep_valid = postprocess.batched_nms(image_boxes, image_scores, image_classes, image_valid,
                                                       iou_threshold=nms_iou_threshold,
                                                       max_detections=max_detections)
            return postprocess.Detections(jnp.where(keep_valid[:, None], image_boxes[keep], 0.0),
                                          jnp.where(keep_valid, image_scores[keep], 0.0),
                                          jnp.where(keep_valid, image_classes[keep], 0), keep_valid)
        voted = postprocess.box_vote(image_boxes, image_scores, image_classes, image_valid,
                                     vote_threshold=vote_threshold, soft=merge == "soft-vote",
                                     soft_score_threshold=soft_score_threshold)
        return postprocess.best_detections(voted, max_detections)

    return jax.vmap(one_image)(boxes, scores, classes, valid)


def merge_views(detections: list[dict[str, np.ndarray]], view_list: list[View], eval_config: ml_collections.ConfigDict,
                *, images_per_call: int = 16) -> dict[str, np.ndarray]:
    """Merges the views' detections of the same images.

    Args:
      detections: per view of ``view_list`` a dict with ``boxes [N, D, 4]`` (original pixels, already
        unmirrored), ``scores [N, D]``, ``classes [N, D]``, ``valid [N, D]``, ``image_id [N]`` in the same
        order in every view, and ``scale [N]`` (the view's resize scale) where the view has a size range.
      view_list: the views (``views``), in the order of ``detections``.
      eval_config: ``config.eval``: its ``tta`` section and ``nms_iou_threshold``.
      images_per_call: images per jitted call (the last call is padded: one compile).

    Returns:
      ``boxes [N, M, 4]``, ``scores``, ``classes``, ``valid`` (M = ``eval_config.tta.max_detections``), best first.
    """
    tta = eval_config.tta
    if tta.merge not in MERGES:
        raise ValueError(f"config.eval.tta.merge={tta.merge!r} is not one of {MERGES}")
    if len(detections) != len(view_list):
        raise ValueError(f"{len(detections)} views of detections for {len(view_list)} views")
    image_ids = detections[0]["image_id"]
    for view in detections[1:]:
        if not np.array_equal(view["image_id"], image_ids):
            raise ValueError("test-time augmentation views visited different images (or in another order); "
                             "every view must read the same evaluation plan")
    valid = []
    for view, predictions in zip(view_list, detections):
        view_valid = predictions["valid"]
        if view.size_range is not None:
            if "scale" not in predictions:
                raise ValueError(f"the view at short side {view.short_side} has a size range but its detections "
                                 "carry no 'scale'")
            view_valid = view_valid & in_size_range(predictions["boxes"], predictions["scale"], view.size_range)
        valid.append(view_valid)
    stacked = {key: np.concatenate([view[key] for view in detections], axis=1)
               for key in ("boxes", "scores", "classes")}
    stacked["valid"] = np.concatenate(valid, axis=1)
    num_images = len(image_ids)
    padded = -(-num_images // images_per_call) * images_per_call
    stacked = {key: np.concatenate([value, np.zeros((padded - num_images, *value.shape[1:]), value.dtype)])
               for key, value in stacked.items()}
    merge = functools.partial(_merge_chunk, merge=tta.merge, nms_iou_threshold=float(eval_config.nms_iou_threshold),
                              vote_threshold=float(tta.vote_threshold),
                              soft_score_threshold=float(tta.soft_score_threshold),
                              max_detections=int(tta.max_detections))
    parts = []
    for start in range(0, padded, images_per_call):
        chunk = {key: value[start:start + images_per_call] for key, value in stacked.items()}
        parts.append(jax.device_get(merge(chunk["boxes"].astype(np.float32), chunk["scores"].astype(np.float32),
                                          chunk["classes"].astype(np.int32), chunk["valid"])))
    max_detections = int(tta.max_detections)
    merged = [np.concatenate(values)[:num_images] for values in zip(*parts)] if parts else [
        np.zeros((0, max_detections, 4), np.float32), np.zeros((0, max_detections), np.float32),
        np.zeros((0, max_detections), np.int32), np.zeros((0, max_detections), bool)]
    return dict(zip(("boxes", "scores", "classes", "valid"), merged))
