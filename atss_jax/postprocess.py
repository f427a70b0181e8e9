"""Fixed-shape inference post-processing: per-level top-k, decoding done by the caller, class-aware NMS, and
the box voting that merges test-time augmentation views (``box_vote``, ``best_detections``).

Everything here works on one image and is batched with ``jax.vmap``; every shape is static
(``pre_nms_topk`` candidates per level, ``max_detections`` outputs), validity travels in masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from atss_jax import boxes as box_lib

# How candidates are ranked and scored (`select_detections`): "official" as the official code,
# "mmdetection" as mmdetection's ATSSHead.
SCORE_RULES = ("official", "mmdetection")

class Detections(NamedTuple):
    """Detections of one image (a leading batch axis when vmapped), best first.

    Attributes:
      boxes: ``[M, 4]`` float32 xyxy in original-image pixels.
      scores: ``[M]`` float32.
      classes: ``[M]`` int32, 0..C-1.
      valid: ``[M]`` bool; padding rows hold zeros.
    """

    boxes: jax.Array
    scores: jax.Array
    classes: jax.Array
    valid: jax.Array


def batched_nms(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    *,
    iou_threshold: float,
    max_detections: int,
) -> tuple[jax.Array, jax.Array]:
    """Greedy class-aware non-maximum suppression with static shapes, for one image.

    Boxes of different classes never suppress each other. Candidates are visited in decreasing score
    (ties: lower index first); a candidate is kept unless a kept box of its class overlaps it with
    IoU > ``iou_threshold``. Stops after ``max_detections`` keeps or the last valid candidate. Memory is
    O(N): each kept box suppresses the rest through one IoU row, so no ``[N, N]`` matrix is built.

    Args:
      boxes: ``[N, 4]`` float32 xyxy.
      scores: ``[N]`` float32.
      classes: ``[N]`` int32.
      valid: ``[N]`` bool; invalid candidates are never kept.
      iou_threshold: overlap above which the lower-scored box is suppressed.
      max_detections: M, the output size.

    Returns:
      ``keep_index [M]`` int32 indices into the inputs in decreasing score, and ``keep_valid [M]``.
    """
    num = boxes.shape[0]
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
    sorted_boxes, sorted_classes, sorted_valid = boxes[order], classes[order], valid[order]

    def visit(state):
        position, count, suppressed, kept = state
        keep = sorted_valid[position] & ~suppressed[position]
        overlap = box_lib.elementwise_iou(sorted_boxes[position], sorted_boxes) > iou_threshold
        same_class = sorted_classes == sorted_classes[position]
        suppressed = suppressed | (keep & overlap & same_class)
        kept = jnp.where(keep, kept.at[jnp.minimum(count, max_detections - 1)].set(position), kept)
        return position + 1, count + keep.astype(jnp.int32), suppressed, kept

    num_valid = jnp.sum(valid)  # sorted first: past them nothing can be kept, so the loop stops there

    def unfinished(state):
        position, count, _, _ = state
        return (position < num_valid) & (count < max_detections)

    init = (jnp.int32(0), jnp.int32(0), jnp.zeros((num,), bool), jnp.zeros((max_detections,), jnp.int32))
    _, count, _, kept = jax.lax.while_loop(unfinished, visit, init)
    keep_valid = jnp.arange(max_detections) < count
    return jnp.where(keep_valid, order[kept], 0).astype(jnp.int32), keep_valid


def level_topk(scores: jax.Array, level_sizes: Sequence[int], k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` best (anchor, class) candidates of each level, for one image.

    Args:
      scores: ``[A, C]`` float32 ranking scores, anchors level by level.
      level_sizes: static anchors per level.
      k: candidates per level (fewer where a level has fewer anchor-class pairs).

    Returns:
      ``anchor_index [K]`` and ``class_index [K]`` int32, ``K = sum_l min(k, A_l * C)``.
    """
    num_classes = scores.shape[1]
    anchors, classes, start = [], [], 0
    for size in level_sizes:
        level = scores[start : start + size].reshape(-1)
        _, flat = jax.lax.top_k(level, min(k, level.shape[0]))
        anchors.append(start + flat // num_classes)
        classes.append(flat % num_classes)
        start += size
    return jnp.concatenate(anchors).astype(jnp.int32), jnp.concatenate(classes).astype(jnp.int32)


def select_detections(
    class_probs: jax.Array,
    centerness: jax.Array,
    decoded_boxes: jax.Array,
    anchor_valid: jax.Array,
    image_size: jax.Array,
    scale: jax.Array,
    *,
    level_sizes: Sequence[int],
    score_threshold: float,
    pre_nms_topk: int,
    iou_threshold: float,
    max_detections: int,
    score_rule: str = "official",
) -> Detections:
    """ATSS inference for one image: threshold, per-level top-k, clip, class-aware NMS, rescale.

    Args:
      class_probs: ``[A, C]`` sigmoid class probabilities.
      centerness: ``[A]`` sigmoid centre-ness.
      decoded_boxes: ``[A, 4]`` predicted boxes, canvas pixels.
      anchor_valid: ``[A]`` bool; anchors outside the image give no detections.
      image_size: ``[2]`` (height, width) of the resized image inside the canvas.
      scale: ``[]`` resized / original; boxes are divided by it.
      level_sizes: static anchors per level.
      score_threshold: minimum class probability (before centre-ness), as the official code.
      pre_nms_topk: candidates per level, ranked by ``class_prob * centerness`` ("official") or ``class_prob``
        ("mmdetection").
      iou_threshold: NMS threshold.
      max_detections: detections kept per image.
      score_rule: one of ``SCORE_RULES``: "official" scores ``sqrt(class_prob * centerness)``;
        "mmdetection" scores ``class_prob * centerness`` and drops boxes of zero width or height after
        clipping (its ``min_bbox_size=0``).

    Returns:
      ``Detections`` in original-image pixels.
    """
    if score_rule not in SCORE_RULES:
        raise ValueError(f"score rule {score_rule!r} is not one of {SCORE_RULES}")
    product = class_probs * centerness[:, None]
    ranking = product if score_rule == "official" else class_probs
    passes = (class_probs > score_threshold) & anchor_valid[:, None]
    anchor_index, class_index = level_topk(jnp.where(passes, ranking, -1.0), level_sizes, pre_nms_topk)
    candidate_valid = passes[anchor_index, class_index]
    candidate_scores = product[anchor_index, class_index]
    candidate_boxes = box_lib.clip_boxes(decoded_boxes[anchor_index], image_size)
    if score_rule == "official":
        candidate_scores = jnp.sqrt(candidate_scores)
    else:
        size = candidate_boxes[:, 2:] - candidate_boxes[:, :2]
        candidate_valid &= jnp.all(size > 0, axis=-1)
    keep, keep_valid = batched_nms(
        candidate_boxes,
        candidate_scores,
        class_index,
        candidate_valid,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
    )
    return Detections(
        boxes=jnp.where(keep_valid[:, None], candidate_boxes[keep] / scale, 0.0),
        scores=jnp.where(keep_valid, candidate_scores[keep], 0.0),
        classes=jnp.where(keep_valid, class_index[keep], 0),
        valid=keep_valid,
    )


def box_vote(
    boxes: jax.Array,
    scores: jax.Array,
    classes: jax.Array,
    valid: jax.Array,
    *,
    vote_threshold: float,
    soft: bool,
    soft_score_threshold: float,
) -> Detections:
    """Class-wise box voting over the candidates of one image: the official test-time augmentation merge.

    The official ``bbox_vote`` / ``soft_bbox_vote`` (``atss_core/engine/bbox_aug_vote.py``) with static
    shapes. Per class, greedily: the best remaining candidate (ties: lower index first) and every remaining
    candidate of its class with IoU >= ``vote_threshold`` form a cluster and leave the pool. The cluster
    gives the score-weighted mean of its boxes with the best score (a lone candidate gives itself). With
    ``soft`` (the official "soft-vote"), each other member also comes back as itself with score
    ``score * (1 - IoU with the best)`` when that is at least ``soft_score_threshold`` (the official
    ``MODEL.RETINANET.INFERENCE_TH``, 0.05 by default). Unlike NMS, nothing is capped here: each candidate
    gives at most one output row, so the output has the input's size.

    IoU is the continuous one (no "+1"): the official boxes count inclusive pixels, ``x2 - x1 + 1`` wide,
    which are this project's continuous boxes shifted by one pixel, so both give the same overlaps.

    Args:
      boxes: ``[N, 4]`` float32 xyxy.
      scores: ``[N]`` float32.
      classes: ``[N]`` int32.
      valid: ``[N]`` bool; invalid candidates take no part.
      vote_threshold: IoU with a cluster's best box from which a candidate joins the cluster.
      soft: also return the soft (down-weighted) members of every cluster.
      soft_score_threshold: smallest score a soft member keeps; must be positive (the official
        code would otherwise also return each cluster's best box a second time, with score 0).

    Returns:
      ``Detections`` with ``[N]`` rows in decreasing input score (not output score); rows that give
      nothing are invalid and hold zeros.
    """
    if soft and soft_score_threshold <= 0:
        raise ValueError(f"soft_score_threshold={soft_score_threshold} must be positive for soft voting")
    num = boxes.shape[0]
    order = jnp.argsort(jnp.where(valid, -scores, jnp.inf), stable=True)
    boxes, scores, classes, valid = boxes[order], scores[order], classes[order], valid[order]
    positions = jnp.arange(num)

    def vote(state):
        remaining, out_boxes, out_scores, out_valid = state
        # In score order the first remaining candidate is the best one left.
        top = jnp.argmax(remaining)
        is_top = positions == top
        overlap = box_lib.elementwise_iou(boxes[top], boxes)
        members = remaining & (classes == classes[top]) & ((overlap >= vote_threshold) | is_top)
        weights = jnp.where(members, scores, 0.0)
        voted = jnp.sum(weights[:, None] * boxes, axis=0) / jnp.maximum(jnp.sum(weights), 1e-12)
        # A lone candidate keeps its own box bit for bit (the official code copies it).
        voted = jnp.where(jnp.sum(members) > 1, voted, boxes[top])
        out_boxes = jnp.where(is_top[:, None], voted, out_boxes)
        out_scores = jnp.where(is_top, scores[top], out_scores)
        out_valid = out_valid | is_top
        if soft:
            soft_scores = scores * (1.0 - overlap)
            extra = members & ~is_top & (soft_scores >= soft_score_threshold)
            out_boxes = jnp.where(extra[:, None], boxes, out_boxes)
            out_scores = jnp.where(extra, soft_scores, out_scores)
            out_valid = out_valid | extra
        return remaining & ~members, out_boxes, out_scores, out_valid

    init = (valid, jnp.zeros_like(boxes), jnp.zeros_like(scores), jnp.zeros((num,), bool))
    _, out_boxes, out_scores, out_valid = jax.lax.while_loop(lambda state: jnp.any(state[0]), vote, init)
    return Detections(boxes=out_boxes, scores=out_scores, classes=jnp.where(out_valid, classes, 0).astype(jnp.int32),
                      valid=out_valid)


def best_detections(detections: Detections, max_detections: int) -> Detections:
    """The ``max_detections`` best-scored valid rows, best first (ties: lower index first).

    Args:
      detections: ``[N]`` rows of one image; any N (padded with invalid rows when below ``max_detections``).
      max_detections: M, the output size.

    Returns:
      ``Detections`` with ``[M]`` rows; padding rows are invalid and hold zeros.
    """
    missing = max_detections - detections.scores.shape[0]
    if missing > 0:
        detections = Detections(*(jnp.concatenate([x, jnp.zeros((missing, *x.shape[1:]), x.dtype)])
                                  for x in detections))
    _, index = jax.lax.top_k(jnp.where(detections.valid, detections.scores, -jnp.inf), max_detections)
    keep_valid = detections.valid[index]
    return Detections(boxes=jnp.where(keep_valid[:, None], detections.boxes[index], 0.0),
                      scores=jnp.where(keep_valid, detections.scores[index], 0.0),
                      classes=jnp.where(keep_valid, detections.classes[index], 0),
                      valid=keep_valid)
