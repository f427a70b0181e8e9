"""Adaptive Training Sample Selection (Zhang et al., CVPR 2020), fixed-shape and vectorised.

For every ground-truth box g:
  1. per FPN level, the ``k = min(topk * anchors_per_location, anchors in level)`` valid anchors
     whose centres are closest to g's centre are candidates;
  2. ``t_g = mean + std`` of the candidates' IoUs with g (std unbiased, both over real candidates);
  3. candidates with ``IoU >= t_g`` whose centre lies inside g by more than ``center_eps`` pixels on
     all four sides are positive;
  4. an anchor positive for several boxes goes to the one of highest IoU (exact ties: lowest index).

This is the readable reference: a top-k over each level's distances for every box.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from atss_jax import boxes as box_lib
from atss_jax.assigners.result import NEGATIVE, AssignResult


def level_candidates(
    anchor_centers: jax.Array,
    anchor_valid: jax.Array,
    gt_centers: jax.Array,
    level_sizes: Sequence[int],
    per_level_k: int,
) -> jax.Array:
    """``[G, K]`` int32 indices of the candidate anchors, ``K = sum_l min(per_level_k, size_l)``.

    Squared distances order anchors exactly like Euclidean ones and, for pixel-grid inputs, are
    computed without rounding, so distance ties are real ties; ``top_k`` breaks them by lower index.
    """
    candidates, start = [], 0
    for size in level_sizes:
        stop = start + size
        # x and y apart: a trailing axis of 2 would be the minor dimension of a [G, size, 2] array.
        dx = gt_centers[:, 0:1] - anchor_centers[None, start:stop, 0]
        dy = gt_centers[:, 1:2] - anchor_centers[None, start:stop, 1]
        sq_distance = dx * dx + dy * dy
        sq_distance = jnp.where(anchor_valid[None, start:stop], sq_distance, jnp.inf)
        _, index = jax.lax.top_k(-sq_distance, min(per_level_k, size))
        candidates.append(index + start)
        start = stop
    return jnp.concatenate(candidates, axis=1).astype(jnp.int32)


def resolve_conflicts(
    candidate_index: jax.Array, positive: jax.Array, candidate_iou: jax.Array, num_anchors: int
) -> jax.Array:
    """Gives each anchor positive for several boxes to the box of highest IoU, ties to lowest index.

    Args:
      candidate_index: ``[G, K]`` int32 anchor index of each candidate; distinct among a row's positives.
      positive: ``[G, K]`` bool.
      candidate_iou: ``[G, K]`` float32 IoU of each candidate with its box.
      num_anchors: A.

    Returns:
      ``[A]`` int32 box index per anchor, -1 where no box claims it. Scatters the positive
      candidates only, so nothing of size ``[G, A]`` is built.
    """
    num_boxes = candidate_index.shape[0]
    # Only positives are written: the others point past the end and are dropped unread.
    claimed = jnp.where(positive, candidate_index, num_anchors).reshape(-1)
    best_iou = jnp.full((num_anchors,), -1.0, candidate_iou.dtype)
    best_iou = best_iou.at[claimed].max(candidate_iou.reshape(-1), mode="drop")
    wins = positive & (candidate_iou == best_iou[candidate_index])
    box_ids = jnp.broadcast_to(jnp.arange(num_boxes, dtype=jnp.int32)[:, None], positive.shape)
    winner = (
        jnp.full((num_anchors,), num_boxes, jnp.int32)
        .at[jnp.where(wins, candidate_index, num_anchors).reshape(-1)]
        .min(box_ids.reshape(-1), mode="drop")
    )
    return jnp.where(winner < num_boxes, winner, NEGATIVE)


def adaptive_threshold(candidate_iou: jax.Array, candidate_valid: jax.Array) -> jax.Array:
    """``mean + std`` (unbiased) of each row's valid IoUs: ``[G, K], [G, K] -> [G]``.

    A row with a single candidate has std 0; a row with none has threshold 0.
    """
    count = jnp.sum(candidate_valid, axis=1)
    mean = jnp.sum(jnp.where(candidate_valid, candidate_iou, 0.0), axis=1) / jnp.maximum(count, 1)
    squared = jnp.where(candidate_valid, jnp.square(candidate_iou - mean[:, None]), 0.0)
    std = jnp.sqrt(jnp.sum(squared, axis=1) / jnp.maximum(count - 1, 1))
    return mean + std


def centers_inside(centers: jax.Array, gt_boxes: jax.Array, margin: float) -> jax.Array:
    """Centre strictly inside the box by more than ``margin`` on all four sides.

    ``centers [..., 2], gt_boxes [..., 4]`` (broadcastable) ``-> [...]`` bool.
    """
    left, top = centers[..., 0] - gt_boxes[..., 0], centers[..., 1] - gt_boxes[..., 1]
    right, bottom = gt_boxes[..., 2] - centers[..., 0], gt_boxes[..., 3] - centers[..., 1]
    # Four explicit minimums: XLA:CPU reduces over a trailing axis of 2 an order of magnitude slower.
    return jnp.minimum(jnp.minimum(left, top), jnp.minimum(right, bottom)) > margin


def atss_assign(
    anchors: jax.Array,
    anchor_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    *,
    level_sizes: Sequence[int],
    topk: int,
    anchors_per_location: int,
    center_eps: float,
) -> AssignResult:
    """ATSS assignment for one image; batch it with ``jax.vmap``.

    Args:
      anchors: ``[A, 4]`` float32 xyxy pixels, level by level (see ``anchors.AnchorGrid``).
      anchor_valid: ``[A]`` bool; invalid anchors are never candidates and always negative.
      gt_boxes: ``[G, 4]`` float32 xyxy pixels, padded to a fixed G.
      gt_valid: ``[G]`` bool; padding boxes are ignored.
      level_sizes: static anchors per level, summing to A.
      topk: candidates per level and box, in locations (ATSS's k).
      anchors_per_location: anchors sharing each location; ``topk * anchors_per_location`` anchors
        are taken per level.
      center_eps: how far inside the box (pixels) a positive's centre must be.

    Returns:
      ``AssignResult`` with ``gt_index [A]``, ``num_positives [G]``, ``iou_threshold [G]``.
    """
    anchors = jnp.asarray(anchors)
    num_anchors = anchors.shape[0]
    if sum(level_sizes) != num_anchors:
        raise ValueError(f"level_sizes {tuple(level_sizes)} sum to {sum(level_sizes)}, not A={num_anchors}")
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    num_boxes = gt_boxes.shape[0]
    if num_boxes == 0:
        return AssignResult(
            gt_index=jnp.full((num_anchors,), NEGATIVE, jnp.int32),
            num_positives=jnp.zeros((0,), jnp.int32),
            iou_threshold=jnp.zeros((0,), jnp.float32),
        )
    candidate_index = level_candidates(
        box_lib.box_centers(anchors),
        anchor_valid,
        box_lib.box_centers(gt_boxes),
        level_sizes,
        topk * anchors_per_location,
    )
    return assign_candidates(anchors, anchor_valid, gt_boxes, gt_valid, candidate_index, center_eps)


def assign_candidates(
    anchors: jax.Array,
    anchor_valid: jax.Array,
    gt_boxes: jax.Array,
    gt_valid: jax.Array,
    candidate_index: jax.Array,
    center_eps: float,
    candidate_mask: jax.Array | None = None,
) -> AssignResult:
    """ATSS steps 2-4 for one image, given each box's candidate anchors (step 1).

    Args:
      anchors: ``[A, 4]``; anchor_valid: ``[A]``; gt_boxes: ``[G, 4]``; gt_valid: ``[G]``.
      candidate_index: ``[G, K]`` int32 candidate anchors of each box, distinct within a row where
        valid; invalid anchors among them (a level with fewer valid anchors than k) are masked here.
      center_eps: how far inside the box (pixels) a positive's centre must be.
      candidate_mask: optional ``[G, K]`` bool; False marks padding slots of ``candidate_index``.
    """
    candidate_valid = anchor_valid[candidate_index] & gt_valid[:, None]
    if candidate_mask is not None:
        candidate_valid &= candidate_mask
    candidate_boxes = anchors[candidate_index]
    candidate_iou = box_lib.elementwise_iou(candidate_boxes, gt_boxes[:, None, :])
    threshold = jnp.where(gt_valid, adaptive_threshold(candidate_iou, candidate_valid), 0.0)
    positive = (
        candidate_valid
        & (candidate_iou >= threshold[:, None])
        & centers_inside(box_lib.box_centers(candidate_boxes), gt_boxes[:, None, :], center_eps)
    )
    gt_index = resolve_conflicts(candidate_index, positive, candidate_iou, anchors.shape[0])
    # A box's anchors are among its candidates, once each: count there, not over all A anchors.
    kept = positive & (gt_index[candidate_index] == jnp.arange(gt_boxes.shape[0], dtype=jnp.int32)[:, None])
    return AssignResult(
        gt_index=gt_index,
        num_positives=jnp.sum(kept, axis=1, dtype=jnp.int32),
        iou_threshold=threshold.astype(jnp.float32),
    )
