"""Optimal Transport Assignment (Ge et al., CVPR 2021), fixed-shape: log-domain Sinkhorn, a fixed iteration count.

Suppliers are the boxes and the background, demanders the anchors (one unit each, valid anchors only):
  * box g supplies its dynamic ``k_g = max(1, floor(sum of its candidate_topk largest candidate IoUs))`` units,
    the background the rest (``valid anchors - sum_g k_g``);
  * transporting a unit from g to anchor a costs ``sum_c focal(x_c, onehot(label_g)) + iou_weight * (1 - GIoU)``,
    plus 1e6 unless a's centre lies inside g and within ``center_radius`` strides of g's centre (the centre
    prior); from the background, ``sum_c focal(x_c, 0)``;
  * the entropic plan is found by ``iterations`` log-domain Sinkhorn steps at ``epsilon`` (the official code:
    0.1 and 50), each supplier's row is divided by its maximum, and every anchor goes to the supplier of largest
    rescaled plan (exact ties: the lowest box index, the background last): a box's anchors are positive.
The soft target of a positive is the IoU of its predicted box with its box.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atss_jax import boxes as box_lib
from atss_jax.assigners.atss import centers_inside
from atss_jax.assigners.result import NEGATIVE, AssignResult, focal_loss_sum, matched_iou, positives_per_box

_OUTSIDE_COST = 1e6
# Sinkhorn's log(mass + eps): a zero mass (a padding box, an invalid anchor) becomes a vanishing one.
_MASS_EPS = 1e-8


def sinkhorn_plan(cost: jax.Array, supply: jax.Array, demand: jax.Array, epsilon: float, iterations: int) -> jax.Array:
    """Entropic optimal-transport plan ``[S, D]`` of ``cost [S, D]``, ``supply [S]``, ``demand [D]``, alternating
    the column (demand) and row (supply) scalings ``iterations`` times in the log domain."""
    log_supply, log_demand = jnp.log(supply + _MASS_EPS), jnp.log(demand + _MASS_EPS)

    def kernel(u, v):
        return (-cost + u[:, None] + v[None, :]) / epsilon

    def body(_, uv):
        u, v = uv
        v = epsilon * (log_demand - jax.nn.logsumexp(kernel(u, v), axis=0)) + v
        u = epsilon * (log_supply - jax.nn.logsumexp(kernel(u, v), axis=1)) + u
        return u, v

    u, v = jax.lax.fori_loop(0, iterations, body, (jnp.zeros_like(supply), jnp.zeros_like(demand)))
    return jnp.exp(kernel(u, v))


def ota_assign(
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
    epsilon: float,
    iterations: int,
    focal_alpha: float,
    focal_gamma: float,
) -> tuple[AssignResult, jax.Array]:
    """OTA assignment of one image; batch it with ``jax.vmap``.

    Args:
      anchors: ``[A, 4]`` xyxy pixels; anchor_strides: ``[A]``; anchor_valid: ``[A]`` bool.
      gt_boxes: ``[G, 4]``; gt_valid: ``[G]`` bool; gt_labels: ``[G]`` int32.
      scores: ``[A, C]`` predicted probabilities; pred_boxes: ``[A, 4]`` decoded boxes (both gradient stopped).
      center_radius: the centre prior's half side in strides; candidate_topk: IoUs summed for the dynamic k (20);
      iou_weight: weight of the GIoU loss in the cost (3); epsilon, iterations: Sinkhorn's (0.1, 50);
      focal_alpha, focal_gamma: the focal loss of the classification cost (0.25, 2).

    Returns:
      ``(AssignResult, quality [A])``: ``iou_threshold`` is 0; quality is the matched IoU at positives.
    """
    if candidate_topk < 1 or iterations < 1:
        raise ValueError(f"OTA needs candidate_topk and iterations of at least 1, got {candidate_topk}, {iterations}")
    anchors = jnp.asarray(anchors)
    num_anchors, num_boxes = anchors.shape[0], gt_boxes.shape[0]
    centers = box_lib.box_centers(anchors)
    radius = center_radius * jnp.asarray(anchor_strides, jnp.float32)[None, :]
    offset = jnp.abs(centers[None, :, :] - box_lib.box_centers(gt_boxes)[:, None, :])  # [G, A, 2]
    near_center = jnp.maximum(offset[..., 0], offset[..., 1]) < radius
    in_box = centers_inside(centers[None, :, :], gt_boxes[:, None, :], 0.0)
    candidate = near_center & in_box & gt_valid[:, None] & anchor_valid[None, :]

    iou = box_lib.pairwise_iou(gt_boxes, pred_boxes)
    giou = box_lib.elementwise_giou(gt_boxes[:, None, :], pred_boxes[None, :, :])
    background = focal_loss_sum(scores, jnp.zeros_like(scores), focal_alpha, focal_gamma)  # [A]
    # A box's classification cost is the background's with its label's term swapped: [G, A], never [G, A, C]
    # (16 images x 100 boxes x 22,400 anchors x 80 classes would be 11 GiB).
    label_scores = scores.T[gt_labels][..., None]  # [G, A, 1]
    swap = (focal_loss_sum(label_scores, jnp.ones_like(label_scores), focal_alpha, focal_gamma)
            - focal_loss_sum(label_scores, jnp.zeros_like(label_scores), focal_alpha, focal_gamma))
    foreground = background[None, :] + swap
    cost = foreground + iou_weight * (1.0 - giou) + jnp.where(candidate, 0.0, _OUTSIDE_COST)
    cost = jnp.concatenate([cost, background[None, :]], axis=0)  # [G + 1, A]

    top_iou, _ = jax.lax.top_k(jnp.where(candidate, iou, 0.0), min(candidate_topk, num_anchors))
    dynamic_k = jnp.where(gt_valid, jnp.maximum(jnp.floor(jnp.sum(top_iou, axis=1)), 1.0), 0.0)
    demand = anchor_valid.astype(jnp.float32)
    supply = jnp.concatenate([dynamic_k, (jnp.sum(demand) - jnp.sum(dynamic_k))[None]])
    plan = sinkhorn_plan(cost, supply, demand, epsilon, iterations)
    rescaled = plan / jnp.max(plan, axis=1, keepdims=True)
    # Padding boxes supply nothing: their (vanishing) rows must not win after the rescaling.
    rescaled = jnp.where(jnp.concatenate([gt_valid, jnp.ones((1,), bool)])[:, None], rescaled, -1.0)
    winner = jnp.argmax(rescaled, axis=0).astype(jnp.int32)
    gt_index = jnp.where((winner < num_boxes) & anchor_valid, winner, NEGATIVE)
    result = AssignResult(
        gt_index=gt_index,
        num_positives=positives_per_box(gt_index, num_boxes),
        iou_threshold=jnp.zeros((num_boxes,), jnp.float32),
    )
    return result, matched_iou(pred_boxes, gt_boxes, gt_index)

