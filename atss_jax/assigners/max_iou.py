"""RetinaNet's max-IoU assignment, the paper's anchor-based baseline (official ``POSITIVE_TYPE: 'IoU'``)."""

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
    in_gt_box: bool,
    center_eps: float,
) -> AssignResult:
    """Max-IoU assignment for one image; batch it with ``jax.vmap``.

    Each valid anchor takes the box it overlaps most (exact ties: lowest box index). It is positive
    when that IoU is ``>= pos_iou_thr``, negative when ``< neg_iou_thr`` and ignored (-2) in
    between. With ``low_quality_matches``, every anchor that reaches a box's best IoU (ties
    included) is positive too, matched to its own highest-IoU box (Detectron2's rule), so each box
    that overlaps any valid anchor has at least one positive.

    ``in_gt_box`` is the paper's "In GT Box" (Table 1): a positive, low-quality matches included, whose
    anchor centre is not inside its box by more than ``center_eps`` on every side is ignored (not
    negative), as the official code's ``POSITIVE_TYPE: 'IoU'`` does (it sets such labels to -1).

    Args:
      anchors: ``[A, 4]`` float32 xyxy pixels.
      anchor_valid: ``[A]`` bool; invalid anchors are always negative.
      gt_boxes: ``[G, 4]`` float32 xyxy pixels, padded.
      gt_valid: ``[G]`` bool.
      pos_iou_thr, neg_iou_thr: IoU thresholds, ``neg_iou_thr <= pos_iou_thr``.
      low_quality_matches: keep each box's best anchors as positives.
      in_gt_box: ignore positives whose anchor centre lies outside their box.
      center_eps: how far inside (pixels) a centre must be, strictly (the official 0.01).

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
    if in_gt_box and num_boxes:
        centers = box_lib.box_centers(anchors)  # [A, 2]
        matched = gt_boxes[jnp.maximum(gt_index, 0)]  # [A, 4]
        margin = jnp.min(jnp.concatenate([centers - matched[:, :2], matched[:, 2:] - centers], axis=-1), axis=-1)
        gt_index = jnp.where((gt_index >= 0) & (margin <= center_eps), IGNORED, gt_index)
    gt_index = jnp.where(anchor_valid, gt_index, NEGATIVE).astype(jnp.int32)
    return AssignResult(
        gt_index=gt_index,
        num_positives=positives_per_box(gt_index, num_boxes),
        iou_threshold=jnp.where(gt_valid, jnp.float32(pos_iou_thr), 0.0),
    )
