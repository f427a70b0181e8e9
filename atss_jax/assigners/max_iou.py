"""RetinaNet's max-IoU assignment, the paper's anchor-based baseline."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atss_jax import boxes as box_lib
from atss_jax.assigners.result import IGNORED, NEGATIVE, AssignResult, positives_per_box


def max_iou_assign(
    anchors: jax.Array,
    anchor_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    pos_iou_thr: float,
    neg_iou_thr: float,
    low_quality_matches: bool,
) -> AssignResult:
    """Max-IoU assignment for one image; batch it with ``jax.vmap``.

    Each valid anchor takes the box it overlaps most (exact ties: lowest box index). It is positive
    when that IoU is ``>= pos_iou_thr``, negative when ``< neg_iou_thr`` and ignored (-2) in
    between. With ``low_quality_matches``, every anchor that reaches a box's best IoU (ties
    included) is positive too, matched to its own highest-IoU box (Detectron2's rule), so each box
    that overlaps any valid anchor has at least one positive.

    Args:
      anchors: ``[A, 4]`` float32 xyxy pixels.
      anchor_valid: ``[A]`` bool; invalid anchors are always negative.
      gt_boxes: ``[G, 4]`` float32 xyxy pixels, padded.
      gt_valid: ``[G]`` bool.
      pos_iou_thr, neg_iou_thr: IoU thresholds, ``neg_iou_thr <= pos_iou_thr``.
      low_quality_matches: keep each box's best anchors as positives.

    Returns:
      ``AssignResult``; ``iou_threshold`` is ``pos_iou_thr`` for every real box.
    """
    if neg_iou_thr > pos_iou_thr:
        raise ValueError(f"neg_iou_thr {neg_iou_thr} must not exceed pos_iou_thr {pos_iou_thr}")
    num_boxes = gt_boxes.shape[0]
    pair_valid = gt_valid[:, None] & anchor_valid[None, :]
    iou = jnp.where(pair_valid, box_lib.pairwise_iou(gt_boxes, anchors), -1.0)  # [G, A]
    best_iou = jnp.max(iou, axis=0, initial=-1.0)
    best_box = jnp.argmax(iou, axis=0).astype(jnp.int32) if num_boxes else jnp.zeros_like(best_iou, jnp.int32)
    gt_index = jnp.where(best_iou >= pos_iou_thr, best_box, jnp.where(best_iou < neg_iou_thr, NEGATIVE, IGNORED))
    if low_quality_matches and num_boxes:
        box_best = jnp.max(iou, axis=1, keepdims=True)
        reaches_box_best = (iou == box_best) & (box_best > 0.0) & pair_valid
        gt_index = jnp.where(jnp.any(reaches_box_best, axis=0), best_box, gt_index)
    gt_index = jnp.where(anchor_valid, gt_index, NEGATIVE).astype(jnp.int32)
    return AssignResult(
        gt_index=gt_index,
        num_positives=positives_per_box(gt_index, num_boxes),
        iou_threshold=jnp.where(gt_valid, jnp.float32(pos_iou_thr), 0.0),
    )
