"""Test-time augmentation: several resized and mirrored views of each image, merged by class-wise NMS.

A view is the plain evaluation at another short side (``config.eval.tta.min_sizes``), optionally of the
mirrored image (``config.eval.tta.flip``). The long-side cap and the canvas scale with the short side,
so a view at ``config.data.eval_min_size`` is exactly the plain evaluation, and each other view is one
more fixed canvas (one more compile). Every view's detections come back in original-image pixels
(mirrored ones are mirrored back); per image, the ``V x max_detections`` candidates of all views go
through the same greedy class-aware NMS as inference (``postprocess.batched_nms``, jitted, fixed shapes)
and the best ``max_detections`` are kept.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from atss_jax import postprocess


@dataclasses.dataclass(frozen=True)
class View:
    """One evaluation pass: the data config to read the split with, and whether images are mirrored."""

    short_side: int
    flip: bool
    data_config: ml_collections.ConfigDict


def views(config: ml_collections.ConfigDict) -> list[View]:
    """The views of ``config.eval.tta``, short sides in the configured order, unflipped before flipped."""
    tta = config.eval.tta
    if not tta.min_sizes:
        raise ValueError("config.eval.tta.min_sizes is empty: test-time augmentation needs at least one short side")
    result = []
    for short_side in tta.min_sizes:
        if short_side <= 0:
            raise ValueError(f"config.eval.tta.min_sizes has {short_side}: short sides must be positive")
        factor = short_side / config.data.eval_min_size
        data_config = ml_collections.ConfigDict(config.data.to_dict())
        data_config.eval_min_size = int(short_side)
        data_config.max_size = round(config.data.max_size * factor)
        data_config.canvas = tuple(32 * math.ceil(side * factor / 32) for side in config.data.canvas)
        for flip in (False, True) if tta.flip else (False,):
            result.append(View(int(short_side), flip, data_config))
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


@functools.partial(jax.jit, static_argnames=("iou_threshold", "max_detections"))
def _merge_chunk(boxes, scores, classes, valid, *, iou_threshold: float, max_detections: int):
    def one_image(image_boxes, image_scores, image_classes, image_valid):
        keep, keep_valid = postprocess.batched_nms(image_boxes, image_scores, image_classes, image_valid,
                                                   iou_threshold=iou_threshold, max_detections=max_detections)
        return (jnp.where(keep_valid[:, None], image_boxes[keep], 0.0), jnp.where(keep_valid, image_scores[keep], 0.0),
                jnp.where(keep_valid, image_classes[keep], 0), keep_valid)

    return jax.vmap(one_image)(boxes, scores, classes, valid)


def merge_views(detections: list[dict[str, np.ndarray]], *, iou_threshold: float, max_detections: int,
                images_per_call: int = 16) -> dict[str, np.ndarray]:
    """Merges the views' detections of the same images.

    Args:
      detections: one dict per view with ``boxes [N, D, 4]`` (original pixels, already unmirrored),
        ``scores [N, D]``, ``classes [N, D]``, ``valid [N, D]``, and ``image_id [N]`` in the same order
        in every view.
      iou_threshold, max_detections: of the class-aware NMS over all views' candidates.
      images_per_call: images per jitted call (the last call is padded: one compile).

    Returns:
      ``boxes [N, M, 4]``, ``scores``, ``classes``, ``valid`` (M = max_detections), best first.
    """
    image_ids = detections[0]["image_id"]
    for view in detections[1:]:
        if not np.array_equal(view["image_id"], image_ids):
            raise ValueError("test-time augmentation views visited different images (or in another order); "
                             "every view must read the same evaluation plan")
    stacked = {key: np.concatenate([view[key] for view in detections], axis=1)
               for key in ("boxes", "scores", "classes", "valid")}
    num_images = len(image_ids)
    padded = -(-num_images // images_per_call) * images_per_call
    stacked = {key: np.concatenate([value, np.zeros((padded - num_images, *value.shape[1:]), value.dtype)])
               for key, value in stacked.items()}
    parts = []
    for start in range(0, padded, images_per_call):
        chunk = {key: value[start:start + images_per_call] for key, value in stacked.items()}
        parts.append(jax.device_get(_merge_chunk(
            chunk["boxes"].astype(np.float32), chunk["scores"].astype(np.float32), chunk["classes"].astype(np.int32),
            chunk["valid"], iou_threshold=iou_threshold, max_detections=max_detections)))
    merged = [np.concatenate(values)[:num_images] for values in zip(*parts)] if parts else [
        np.zeros((0, max_detections, 4), np.float32), np.zeros((0, max_detections), np.float32),
        np.zeros((0, max_detections), np.int32), np.zeros((0, max_detections), bool)]
    return dict(zip(("boxes", "scores", "classes", "valid"), merged))
