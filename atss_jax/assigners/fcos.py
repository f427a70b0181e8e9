"""FCOS's spatial-and-scale assignment and its centre-sampling variant (the paper's baselines)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from atss_jax import boxes as box_lib
from atss_jax.assigners.result import NEGATIVE, AssignResult, positives_per_box


def fcos_assign(
    anchors: jax.Array,
    anchor_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    level_sizes: Sequence[int],
    level_strides: Sequence[int],
    regress_ranges: Sequence[tuple[float, float]],
    center_sampling_radius: float | None = None,
) -> AssignResult:
    """FCOS assignment for one image; batch it with ``jax.vmap``.

    A point (an anchor's centre) is positive for a box when it lies strictly inside the box (or,
    with ``center_sampling_radius`` r, inside the box intersected with the square of half-side
    ``r * stride`` around the box centre) and its largest distance to the box's sides lies within
    its level's regression range ``[lo, hi]``. Among several such boxes the smallest area wins
    (exact ties: lowest index).

    Args:
      anchors: ``[A, 4]`` float32 xyxy pixels; only their centres are used.
      anchor_valid: ``[A]`` bool; invalid points are always negative.
      gt_boxes: ``[G, 4]`` float32 xyxy pixels, padded.
      gt_valid: ``[G]`` bool.
      level_sizes: static points per level, summing to A.
      level_strides: stride of each level.
      regress_ranges: ``(lo, hi)`` in pixels for each level.
      center_sampling_radius: None for plain FCOS, e.g. 1.5 for centre sampling.

    Returns:
      ``AssignResult``; ``iou_threshold`` is 0 (no IoU rule).
    """
    if not len(level_sizes) == len(level_strides) == len(regress_ranges):
        raise ValueError(
            f"level_sizes ({len(level_sizes)}), level_strides ({len(level_strides)}) and "
            f"regress_ranges ({len(regress_ranges)}) must have one entry per level"
        )
    if sum(level_sizes) != anchors.shape[0]:
        raise ValueError(f"level_sizes sum to {sum(level_sizes)}, not A={anchors.shape[0]}")
    num_boxes = gt_boxes.shape[0]
    points = box_lib.box_centers(anchors)[None, :, :]  # [1, A, 2]
    stride = np.repeat(np.asarray(level_strides, np.float32), level_sizes)
    low, high = (np.repeat(np.asarray(r, np.float32), level_sizes) for r in zip(*regress_ranges))
    boxes = gt_boxes[:, None, :]  # [G, 1, 4]
    side_distances = jnp.concatenate([points - boxes[..., :2], boxes[..., 2:] - points], axis=-1)
    if center_sampling_radius is None:
        inside = side_distances.min(-1) > 0
    else:
        centers = box_lib.box_centers(boxes)
        radius = (center_sampling_radius * stride)[None, :, None]
        region = jnp.concatenate(
            [jnp.maximum(centers - radius, boxes[..., :2]), jnp.minimum(centers + radius, boxes[..., 2:])],
            axis=-1,
        )
        inside = jnp.minimum((points - region[..., :2]).min(-1), (region[..., 2:] - points).min(-1)) > 0
    reach = side_distances.max(-1)
    in_range = (reach >= low) & (reach <= high)
    matches = inside & in_range & gt_valid[:, None] & anchor_valid[None, :]  # [G, A]
    area = jnp.where(matches, box_lib.box_area(boxes), jnp.inf)
    if num_boxes:
        smallest = jnp.argmin(area, axis=0).astype(jnp.int32)
        gt_index = jnp.where(jnp.any(matches, axis=0), smallest, NEGATIVE)
    else:
        gt_index = jnp.full((anchors.shape[0],), NEGATIVE, jnp.int32)
    return AssignResult(
        gt_index=gt_index,
        num_positives=positives_per_box(gt_index, num_boxes),
        iou_threshold=jnp.zeros((num_boxes,), jnp.float32),
    )
