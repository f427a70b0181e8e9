"""The output every assigner returns, and helpers shared by them."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from atss_jax import boxes as box_lib

NEGATIVE = -1
IGNORED = -2


class AssignResult(NamedTuple):
    """Assignment of one image's anchors to its ground-truth boxes (vmapped: a leading batch axis).

    Attributes:
      gt_index: ``[A]`` int32, the matched box for positives, ``-1`` (NEGATIVE) for negatives and
        invalid anchors, ``-2`` (IGNORED) for anchors excluded from the classification loss
        (max-IoU assigner only).
      num_positives: ``[G]`` int32, anchors finally assigned to each box (after conflicts are
        resolved); 0 for padding boxes.
      iou_threshold: ``[G]`` float32, the IoU a candidate needed to become positive for each box
        (ATSS: mean + std of its candidates; max-IoU: the fixed positive threshold; FCOS: 0, it has
        no IoU rule); 0 for padding boxes.
    """

    gt_index: jax.Array
    num_positives: jax.Array
    iou_threshold: jax.Array


def positives_per_box(gt_index: jax.Array, num_boxes: int) -> jax.Array:
    """``gt_index [A] -> [num_boxes]`` int32 count of anchors assigned to each box."""
    # Negative codes go to an overflow bin that the scatter drops (a negative index would wrap).
    bins = jnp.where(gt_index >= 0, gt_index, num_boxes)
    return jnp.zeros((num_boxes,), jnp.int32).at[bins].add(1, mode="drop")


def matched_iou(pred_boxes: jax.Array, gt_boxes: jax.Array, gt_index: jax.Array) -> jax.Array:
    """IoU of each positive's predicted box with its box, 0 elsewhere: ``[A, 4], [G, 4], [A] -> [A]`` float32.

    The soft target of assigners whose quality is the plain IoU (GFL's and VarifocalNet's).
    """
    matched = gt_boxes[jnp.maximum(gt_index, 0)]
    return jnp.where(gt_index >= 0, box_lib.elementwise_iou(pred_boxes, matched), 0.0).astype(jnp.float32)


def focal_loss_sum(probabilities: jax.Array, targets: jax.Array, alpha: float, gamma: float) -> jax.Array:
    """Sigmoid focal loss of probabilities (the assigners get no logits, and a saturated sigmoid has none), summed
    over the last (class) axis: ``[..., C], [..., C] -> [...]``; logs clamped at -100 as torch's BCE."""
    p_t = jnp.where(targets > 0, probabilities, 1.0 - probabilities)
    alpha_t = jnp.where(targets > 0, alpha, 1.0 - alpha)
    return jnp.sum(alpha_t * (1.0 - p_t) ** gamma * -jnp.maximum(jnp.log(p_t), -100.0), axis=-1)
