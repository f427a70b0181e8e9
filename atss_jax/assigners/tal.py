"""TOOD's task-aligned assigner (Feng et al., ICCV 2021), fixed-shape, as mmdetection 3.3.0's TaskAlignedAssigner.

For every ground-truth box g, with s the predicted score of g's class and IoU that of the predicted box:
  1. alignment ``t = s^alpha * IoU^beta`` for every valid anchor;
  2. the ``topk`` anchors of highest t over all levels are candidates (mmdetection ranks every anchor, then
     filters: the centre test comes after the top-k, so a box may keep fewer than ``topk`` positives);
  3. candidates with ``t > 0`` whose anchor centre lies inside g by more than ``center_eps`` are positive;
  4. an anchor positive for several boxes goes to the one whose predicted-box IoU is highest (exact ties: the
     lowest box index, as ``torch.max``'s first maximum on CPU).
The soft target of a positive is TOOD's normalised alignment ``t * max IoU / (max t + 1e-7)``, maxima over the
box's final positives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atss_jax import boxes as box_lib
from atss_jax.assigners.atss import centers_inside, resolve_conflicts
from atss_jax.assigners.result import AssignResult

# mmdetection's 10e-8 in the normalisation.
_NORMALISER_EPS = 1e-7


def tal_assign(
    anchors: jax.Array,
    anchor_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    gt_labels: jax.Array,
    scores: jax.Array,
    pred_boxes: jax.Array,
    *,
    topk: int,
    alpha: float,
    beta: float,
    center_eps: float,
) -> tuple[AssignResult, jax.Array]:
    """Task-aligned assignment of one image; batch it with ``jax.vmap``.

    Args:
      anchors: ``[A, 4]`` float32 xyxy pixels (their centres must lie inside a positive's box).
      anchor_valid: ``[A]`` bool; invalid anchors are never candidates.
      gt_boxes: ``[G, 4]`` float32 xyxy pixels; gt_valid: ``[G]`` bool; gt_labels: ``[G]`` int32 in 0..C-1.
      scores: ``[A, C]`` predicted class probabilities (gradient stopped).
      pred_boxes: ``[A, 4]`` decoded predicted boxes, xyxy pixels (gradient stopped).
      topk: candidates per box (TOOD: 13); alpha, beta: exponents of score and IoU (1 and 6).
      center_eps: how far inside the box (pixels) a positive's anchor centre must be (mmdetection: 0.01).

    Returns:
      ``(AssignResult, quality [A])``: ``iou_threshold`` is 0 (no IoU rule); quality is the normalised alignment
      at positives, 0 elsewhere.
    """
    if topk < 1:
        raise ValueError(f"config.assigner.tal_topk must be at least 1, got {topk}")
    anchors = jnp.asarray(anchors)
    num_anchors, num_boxes = anchors.shape[0], gt_boxes.shape[0]
    iou = box_lib.pairwise_iou(gt_boxes, pred_boxes)  # [G, A]
    box_scores = jnp.take(scores, gt_labels, axis=1).T  # [G, A]
    alignment = box_scores**alpha * iou**beta
    # Invalid anchors rank last and, at t = -1, can never pass the t > 0 test.
    ranked = jnp.where(anchor_valid[None, :], alignment, -1.0)
    candidate_alignment, candidate_index = jax.lax.top_k(ranked, min(topk, num_anchors))
    candidate_iou = jnp.take_along_axis(iou, candidate_index, axis=1)
    anchor_centers = box_lib.box_centers(anchors)
    positive = (
        (candidate_alignment > 0.0)
        & gt_valid[:, None]
        & centers_inside(anchor_centers[candidate_index], gt_boxes[:, None, :], center_eps)
    )
    gt_index = resolve_conflicts(candidate_index, positive, candidate_iou, num_anchors)
    kept = positive & (gt_index[candidate_index] == jnp.arange(num_boxes, dtype=jnp.int32)[:, None])
    max_alignment = jnp.max(jnp.where(kept, candidate_alignment, 0.0), axis=1, keepdims=True)
    max_iou = jnp.max(jnp.where(kept, candidate_iou, 0.0), axis=1, keepdims=True)
    normalised = candidate_alignment / (max_alignment + _NORMALISER_EPS) * max_iou
    quality = (
        jnp.zeros((num_anchors,), jnp.float32)
        .at[jnp.where(kept, candidate_index, num_anchors).reshape(-1)]
        .set(normalised.reshape(-1).astype(jnp.float32), mode="drop")
    )
    result = AssignResult(
        gt_index=gt_index,
        num_positives=jnp.sum(kept, axis=1, dtype=jnp.int32),
        iou_threshold=jnp.zeros((num_boxes,), jnp.float32),
    )
    return result, quality
