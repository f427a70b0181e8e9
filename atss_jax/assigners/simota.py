"""YOLOX's SimOTA (Ge et al. 2021), fixed-shape, as mmdetection 3.3.0's SimOTAAssigner.

For every ground-truth box g, over the anchors whose centre lies inside some box or some box's centre region
(``center_radius`` strides around its centre; the others take no part):
  1. cost = ``cls_weight * sum_c BCE(p_c, onehot(label_g)) + iou_weight * -log(IoU + 1e-7)``, plus 1e5 unless
     the centre lies both inside g and inside g's centre region;
  2. dynamic ``k_g = max(1, floor(sum of g's candidate_topk largest IoUs))`` (so ``k_g <= candidate_topk``: the
     fixed shape);
  3. the ``k_g`` anchors of lowest cost match g;
  4. an anchor matched to several boxes goes to its lowest-cost box over ALL boxes (mmdetection's ``torch.min``
     over the full cost row; exact ties: the lowest box index).
The soft target of a positive is the IoU of its predicted box with its box (YOLOX's IoU-aware target).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atss_jax import boxes as box_lib
from atss_jax.assigners.atss import centers_inside
from atss_jax.assigners.result import NEGATIVE, AssignResult, matched_iou, positives_per_box

# mmdetection's constants: the cost outside the box-and-centre region, the IoU cost's epsilon and the log clamp of
# torch's binary_cross_entropy.
_OUTSIDE_COST = 1e5
_IOU_EPS = 1e-7
_LOG_CLAMP = -100.0


def simota_assign(
    anchors: jax.Array,
    anchor_strides: jax.Array,
    anchor_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    gt_labels: jax.Array,
    scores: jax.Array,
    pred_boxes: jax.Array,
    *,
    center_radius: float,
    candidate_topk: int,
    iou_weight: float,
    cls_weight: float,
) -> tuple[AssignResult, jax.Array]:
    """SimOTA assignment of one image; batch it with ``jax.vmap``.

    Args:
      anchors: ``[A, 4]`` xyxy pixels: their centres are YOLOX's points; anchor_strides: ``[A]`` their strides.
      anchor_valid: ``[A]`` bool; gt_boxes: ``[G, 4]``; gt_valid: ``[G]`` bool; gt_labels: ``[G]`` int32.
      scores: ``[A, C]`` predicted probabilities; pred_boxes: ``[A, 4]`` decoded boxes (both gradient stopped).
      center_radius: the centre region's half side, in strides (2.5); candidate_topk: IoUs summed for the
        dynamic k (10); iou_weight, cls_weight: cost weights (3 and 1).

    Returns:
      ``(AssignResult, quality [A])``: ``iou_threshold`` is 0; quality is the matched IoU at positives.
    """
    if candidate_topk < 1:
        raise ValueError(f"config.assigner.simota_candidate_topk must be at least 1, got {candidate_topk}")
    anchors = jnp.asarray(anchors)
    num_anchors, num_boxes = anchors.shape[0], gt_boxes.shape[0]
    centers = box_lib.box_centers(anchors)
    radius = center_radius * jnp.asarray(anchor_strides, jnp.float32)
    gt_centers = box_lib.box_centers(gt_boxes)
    regions = jnp.stack([gt_centers[:, None, 0] - radius, gt_centers[:, None, 1] - radius,
                         gt_centers[:, None, 0] + radius, gt_centers[:, None, 1] + radius], axis=-1)  # [G, A, 4]
    in_box = centers_inside(centers[None, :, :], gt_boxes[:, None, :], 0.0) & gt_valid[:, None]
    in_center = centers_inside(centers[None, :, :], regions, 0.0) & gt_valid[:, None]
    considered = anchor_valid & jnp.any(in_box | in_center, axis=0)  # [A]

    iou = box_lib.pairwise_iou(gt_boxes, pred_boxes)  # [G, A]
    # sum_c BCE(p_c, onehot(l)) = sum_c -log(1 - p_c) - (-log(1 - p_l)) + -log(p_l), logs clamped as torch's.
    negative_bce = -jnp.maximum(jnp.log1p(-scores), _LOG_CLAMP)  # [A, C]
    positive_bce = -jnp.maximum(jnp.log(scores), _LOG_CLAMP)
    cls_cost = (jnp.sum(negative_bce, axis=1)[None, :] - jnp.take(negative_bce, gt_labels, axis=1).T
                + jnp.take(positive_bce, gt_labels, axis=1).T)
    cost = cls_cost * cls_weight + -jnp.log(iou + _IOU_EPS) * iou_weight + jnp.where(in_box & in_center, 0.0,
                                                                                     _OUTSIDE_COST)
    cost = jnp.where(considered[None, :] & gt_valid[:, None], cost, jnp.inf)

    topk = min(candidate_topk, num_anchors)
    top_iou, _ = jax.lax.top_k(jnp.where(considered[None, :], iou, 0.0), topk)
    dynamic_k = jnp.maximum(jnp.floor(jnp.sum(top_iou, axis=1)), 1.0).astype(jnp.int32)  # [G]
    negated_cost, candidate_index = jax.lax.top_k(-cost, topk)
    matched = (jnp.arange(topk)[None, :] < dynamic_k[:, None]) & jnp.isfinite(negated_cost)
    matches = positives_per_box(jnp.where(matched, candidate_index, -1).reshape(-1), num_anchors)  # per anchor
    box_ids = jnp.broadcast_to(jnp.arange(num_boxes, dtype=jnp.int32)[:, None], matched.shape)
    only_box = (jnp.full((num_anchors,), -1, jnp.int32)
                .at[jnp.where(matched, candidate_index, num_anchors).reshape(-1)]
                .max(box_ids.reshape(-1), mode="drop"))
    cheapest = jnp.argmin(cost, axis=0).astype(jnp.int32)
    gt_index = jnp.where(matches > 1, cheapest, jnp.where(matches == 1, only_box, NEGATIVE))
    result = AssignResult(
        gt_index=gt_index,
        num_positives=positives_per_box(gt_index, num_boxes),
        iou_threshold=jnp.zeros((num_boxes,), jnp.float32),
    )
    return result, matched_iou(pred_boxes, gt_boxes, gt_index)
