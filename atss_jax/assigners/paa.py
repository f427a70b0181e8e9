"""Probabilistic Anchor Assignment (Kim and Lee, ECCV 2020), fixed-shape, as mmdetection 3.3.0's PAAHead.

  1. an initial max-IoU assignment of the anchors at IoU 0.1 (each box's best anchors kept; Detectron2's
     low-quality rule: such an anchor goes to its own best box);
  2. each initial positive scores ``sum_c focal(p_c, onehot(label)) + box_weight * (1 - GIoU(predicted, box))``;
  3. per box and FPN level, its ``topk`` initial positives of lowest score are candidates, sorted by score;
  4. a two-component 1-D Gaussian mixture is fitted to each box's candidate scores by ``em_iterations`` EM steps
     from sklearn's start as mmdetection gives it (means the lowest and highest score, variances 1, weights
     1/2; variances regularised by 1e-6);
  5. the candidates the first (low-loss) component claims, up to the one of highest mixture log-likelihood in the
     sorted order, are positive (the paper's Fig. 3 (c)); every other initial positive becomes negative, as do
     all of a box with fewer than two candidates.
The soft target of a positive is the IoU of its predicted box with its box.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from atss_jax import boxes as box_lib
from atss_jax.assigners.max_iou import max_iou_assign
from atss_jax.assigners.result import NEGATIVE, AssignResult, focal_loss_sum, matched_iou, positives_per_box

_INITIAL_IOU = 0.1
_REG_COVAR = 1e-6  # sklearn's default
_LOG_2PI = 1.8378770664093453


def _component_log_prob(x: jax.Array, mean: jax.Array, variance: jax.Array, weight: jax.Array) -> jax.Array:
    """``log(w_k N(x | mean_k, variance_k))``: ``x [G, K], params [G, 2] -> [G, K, 2]``."""
    x = x[..., None]
    mean, variance, weight = mean[:, None, :], variance[:, None, :], weight[:, None, :]
    return -0.5 * (_LOG_2PI + jnp.log(variance) + (x - mean) ** 2 / variance) + jnp.log(weight)


def fit_two_gaussians(x: jax.Array, valid: jax.Array, iterations: int) -> tuple[jax.Array, jax.Array]:
    """EM for a two-component 1-D mixture per row, from (lowest, highest) means, unit variances, equal weights.

    Args:
      x: ``[G, K]`` samples; valid: ``[G, K]`` bool, the row's real samples (at least one where it matters).
      iterations: EM steps (each an E-step then an M-step, as sklearn's loop).

    Returns:
      ``(component [G, K] int32, log_likelihood [G, K])``: each sample's most likely component (ties: 0) and its
      log-density under the mixture, from the fitted parameters (sklearn's ``predict`` and ``score_samples``).
    """
    weight = jnp.where(valid, 1.0, 0.0)
    mean = jnp.stack([jnp.min(jnp.where(valid, x, jnp.inf), axis=1), jnp.max(jnp.where(valid, x, -jnp.inf), axis=1)],
                     axis=1)
    mean = jnp.where(jnp.isfinite(mean), mean, 0.0)
    params = (mean, jnp.ones_like(mean), jnp.full_like(mean, 0.5))

    def em_step(_, params):
        log_prob = _component_log_prob(x, *params)
        responsibility = jnp.exp(log_prob - jax.nn.logsumexp(log_prob, axis=-1, keepdims=True)) * weight[..., None]
        count = jnp.sum(responsibility, axis=1) + 10.0 * jnp.finfo(x.dtype).eps  # [G, 2], sklearn's guard
        mean = jnp.sum(responsibility * x[..., None], axis=1) / count
        variance = jnp.sum(responsibility * (x[..., None] - mean[:, None, :]) ** 2, axis=1) / count + _REG_COVAR
        return mean, variance, count / jnp.maximum(jnp.sum(weight, axis=1, keepdims=True), 1.0)

    params = jax.lax.fori_loop(0, iterations, em_step, params)
    log_prob = _component_log_prob(x, *params)
    return jnp.argmax(log_prob, axis=-1).astype(jnp.int32), jax.nn.logsumexp(log_prob, axis=-1)


def paa_assign(
    anchors: jax.Array,
    anchor_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    gt_labels: jax.Array,
    scores: jax.Array,
    pred_boxes: jax.Array,
    *,
    level_sizes: Sequence[int],
    topk: int,
    box_weight: float,
    em_iterations: int,
    focal_alpha: float,
    focal_gamma: float,
) -> tuple[AssignResult, jax.Array]:
    """PAA of one image; batch it with ``jax.vmap``.

    Args:
      anchors: ``[A, 4]`` xyxy pixels, level by level (``level_sizes`` static, summing to A); anchor_valid: ``[A]``.
      gt_boxes: ``[G, 4]``; gt_valid: ``[G]`` bool; gt_labels: ``[G]`` int32.
      scores: ``[A, C]`` predicted probabilities; pred_boxes: ``[A, 4]`` decoded boxes (both gradient stopped).
      topk: candidates per box and level (9); box_weight: the GIoU loss's weight in the score (1.3);
      em_iterations: EM steps; focal_alpha, focal_gamma: the focal loss of the score (0.25, 2).

    Returns:
      ``(AssignResult, quality [A])``: ``iou_threshold`` is the initial 0.1; quality the matched IoU at positives.
    """
    if topk < 1 or em_iterations < 1:
        raise ValueError(f"PAA needs topk and em_iterations of at least 1, got {topk}, {em_iterations}")
    anchors = jnp.asarray(anchors)
    num_anchors, num_boxes = anchors.shape[0], gt_boxes.shape[0]
    if sum(level_sizes) != num_anchors:
        raise ValueError(f"level_sizes {tuple(level_sizes)} sum to {sum(level_sizes)}, not A={num_anchors}")
    initial = max_iou_assign(anchors, anchor_valid, gt_boxes, gt_valid, pos_iou_thr=_INITIAL_IOU,
                             neg_iou_thr=_INITIAL_IOU, low_quality_matches=True, in_gt_box=False, center_eps=0.0)
    matched = jnp.maximum(initial.gt_index, 0)
    one_hot = jax.nn.one_hot(gt_labels[matched], scores.shape[-1])
    giou = box_lib.elementwise_giou(pred_boxes, gt_boxes[matched])
    loss = focal_loss_sum(scores, one_hot, focal_alpha, focal_gamma) + box_weight * (1.0 - giou)  # [A]

    owned = initial.gt_index[None, :] == jnp.arange(num_boxes, dtype=jnp.int32)[:, None]  # [G, A]
    ranked = jnp.where(owned, -loss[None, :], -jnp.inf)
    candidates, start = [], 0
    for size in level_sizes:
        _, index = jax.lax.top_k(ranked[:, start:start + size], min(topk, size))
        candidates.append(index + start)
        start += size
    candidate_index = jnp.concatenate(candidates, axis=1)  # [G, K]
    candidate_valid = jnp.take_along_axis(owned, candidate_index, axis=1)
    order = jnp.argsort(jnp.where(candidate_valid, loss[candidate_index], jnp.inf), axis=1, stable=True)
    candidate_index = jnp.take_along_axis(candidate_index, order, axis=1)
    candidate_valid = jnp.take_along_axis(candidate_valid, order, axis=1)
    candidate_loss = loss[candidate_index]

    component, log_likelihood = fit_two_gaussians(candidate_loss, candidate_valid, em_iterations)
    foreground = candidate_valid & (component == 0)
    last = jnp.argmax(jnp.where(foreground, log_likelihood, -jnp.inf), axis=1)  # [G]
    enough = jnp.sum(candidate_valid, axis=1) >= 2
    positive = foreground & (jnp.arange(candidate_index.shape[1])[None, :] <= last[:, None]) & enough[:, None]
    box_ids = jnp.broadcast_to(jnp.arange(num_boxes, dtype=jnp.int32)[:, None], positive.shape)
    # Candidates of different boxes are different anchors (each anchor has one initial box): no conflicts.
    gt_index = (jnp.full((num_anchors,), NEGATIVE, jnp.int32)
                .at[jnp.where(positive, candidate_index, num_anchors).reshape(-1)]
                .set(box_ids.reshape(-1), mode="drop"))
    result = AssignResult(
        gt_index=gt_index,
        num_positives=positives_per_box(gt_index, num_boxes),
        iou_threshold=jnp.where(gt_valid, jnp.float32(_INITIAL_IOU), 0.0),
    )
    return result, matched_iou(pred_boxes, gt_boxes, gt_index)
