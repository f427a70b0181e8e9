"""ATSS losses: sigmoid focal (or quality focal / varifocal) loss, GIoU (or smooth-L1) box loss, centre-ness BCE.

Normalisers are counted over the whole global batch: with ``axis_name`` the positive count and the
centre-ness sum are averaged over that named device axis (``pmean``, as mmdetection's
``reduce_mean``), so that averaging the per-device losses and gradients (``pmean``) gives exactly
the loss of the global batch on one device, whatever the number of devices.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from atss_jax import boxes as box_lib
from atss_jax import errors
from atss_jax.assigners.result import IGNORED

BOX_LOSSES = ("giou", "smooth_l1")
# "focal": hard one-hot targets; "quality_focal" (GFL) and "varifocal" (VarifocalNet): the positives' target is a
# quality in [0, 1] (the assigner's soft target, else the IoU of the predicted box with its box).
CLASSIFICATION_LOSSES = ("focal", "quality_focal", "varifocal")


class LossTerms(NamedTuple):
    """Scalar loss terms of one device's batch (already divided by the global normalisers)."""

    classification: jax.Array
    box: jax.Array
    centerness: jax.Array
    total: jax.Array
    num_positives: jax.Array  # positives per device, averaged over the device axis


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float, gamma: float) -> jax.Array:
    """Elementwise focal loss (Lin et al. 2017): ``logits, targets [...] -> [...]``, targets in {0, 1}."""
    prob = jax.nn.sigmoid(logits)
    cross_entropy = optax.losses.sigmoid_binary_cross_entropy(logits, targets)
    p_t = prob * targets + (1.0 - prob) * (1.0 - targets)
    alpha_t = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    return alpha_t * (1.0 - p_t) ** gamma * cross_entropy


def quality_focal_loss(logits: jax.Array, targets: jax.Array, beta: float) -> jax.Array:
    """Elementwise QFL (Li et al. 2020): ``|y - sigmoid(x)|^beta * BCE(x, y)``; ``logits, targets [...] -> [...]``,
    targets in [0, 1] (0 for every negative)."""
    scale = jnp.abs(targets - jax.nn.sigmoid(logits)) ** beta
    return scale * optax.losses.sigmoid_binary_cross_entropy(logits, targets)


def varifocal_loss(logits: jax.Array, targets: jax.Array, alpha: float, gamma: float) -> jax.Array:
    """Elementwise VFL (Zhang et al. 2021), IoU-weighted: ``logits, targets [...] -> [...]``, targets in [0, 1].

    Positives (``y > 0``) weigh ``y * BCE``; the rest ``alpha * sigmoid(x)^gamma * BCE`` (mmdetection's
    ``|sigmoid(x) - y|^gamma`` with y = 0).
    """
    weight = jnp.where(targets > 0.0, targets, alpha * jnp.abs(jax.nn.sigmoid(logits) - targets) ** gamma)
    return weight * optax.losses.sigmoid_binary_cross_entropy(logits, targets)


def centerness_targets(points: jax.Array, boxes: jax.Array) -> jax.Array:
    """FCOS centre-ness of ``points [..., 2]`` in ``boxes [..., 4]``: ``[...]`` in [0, 1].

    ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``; 0 for points on or outside the border.
    """
    left_top = points - boxes[..., :2]
    right_bottom = boxes[..., 2:] - points
    low = jnp.maximum(jnp.minimum(left_top, right_bottom), 0.0)
    high = jnp.maximum(jnp.maximum(left_top, right_bottom), 1e-6)
    return jnp.sqrt(jnp.prod(low / high, axis=-1))


def _smooth_l1(diff: jax.Array, beta: float) -> jax.Array:
    absolute = jnp.abs(diff)
    return jnp.where(absolute < beta, 0.5 * absolute**2 / beta, absolute - 0.5 * beta)


def detection_losses(
    class_logits: jax.Array,
    box_regression: jax.Array,
    centerness_logits: jax.Array,
    *,
    anchors: jax.Array,
    anchor_strides: jax.Array,
    anchor_valid: jax.Array,
    gt_index: jax.Array,
    gt_boxes: jax.Array,
    gt_labels: jax.Array,
    config: ml_collections.ConfigDict,
    regression: str,
    use_centerness: bool,
    axis_name: str | None = None,
    quality_targets: jax.Array | None = None,
    box_coder: str = "official",
) -> LossTerms:
    """ATSS losses of one device's batch, given the assignment.

    Args:
      class_logits: ``[B, A, C]``.
      box_regression: ``[B, A, 4]``: deltas (``regression="box"``) or LTRB distances in strides
        (``"point"``, already made non-negative by the head).
      centerness_logits: ``[B, A]``.
      anchors: ``[A, 4]`` xyxy pixels (for ``"point"``, their centres are the points).
      anchor_strides: ``[A]`` stride of each anchor's level.
      anchor_valid: ``[B, A]`` bool; invalid anchors contribute nothing.
      gt_index: ``[B, A]`` int32 from the assigner: box index, ``NEGATIVE`` or ``IGNORED``.
      gt_boxes: ``[B, G, 4]`` xyxy pixels; gt_labels: ``[B, G]`` int32 in 0..C-1.
      config: the ``loss`` section of the experiment config: ``box_loss`` ("giou" on decoded boxes or
        "smooth_l1" on deltas, ``"box"`` regression only), ``box_loss_weight``, ``focal_alpha``,
        ``focal_gamma``, ``smooth_l1_beta``, ``classification`` (one of ``CLASSIFICATION_LOSSES``),
        ``quality_beta`` (QFL), ``varifocal_alpha``, ``varifocal_gamma``.
      regression: "box" or "point" (``config.model.head.regression``).
      use_centerness: False drops the centre-ness branch and its weighting of the box loss.
      axis_name: named device axis for the global normalisers, or None on one device.
      quality_targets: optional ``[B, A]`` soft targets in [0, 1] of a prediction-aware assigner, read by the
        quality losses (``config.classification``) at positives; None = the IoU of each positive's predicted
        (gradient-stopped) box with its box.
      box_coder: how "box" deltas decode for the GIoU loss (``boxes.BOX_CODERS``, ``config.model.head.box_coder``).

    Returns:
      ``LossTerms``. A batch with no positives gives finite losses and gradients.
    """
    if regression not in box_lib.REGRESSIONS:
        raise errors.ConfigError(f"regression={regression!r} is not one of {box_lib.REGRESSIONS}")
    if config.box_loss not in BOX_LOSSES:
        raise errors.ConfigError(f"config.loss.box_loss={config.box_loss!r} is not one of {BOX_LOSSES}")
    if config.box_loss == "smooth_l1" and regression != "box":
        raise errors.ConfigError("config.loss.box_loss='smooth_l1' regresses deltas: it needs regression='box'")
    if config.classification not in CLASSIFICATION_LOSSES:
        raise errors.ConfigError(
            f"config.loss.classification={config.classification!r} is not one of {CLASSIFICATION_LOSSES}")
    num_classes = class_logits.shape[-1]
    positive = (gt_index >= 0) & anchor_valid
    counted = (gt_index != IGNORED) & anchor_valid  # positives and negatives: the focal loss's anchors
    matched = jnp.maximum(gt_index, 0)
    matched_boxes = jnp.take_along_axis(gt_boxes, matched[..., None], axis=1)  # [B, A, 4]
    matched_labels = jnp.take_along_axis(gt_labels, matched, axis=1)

    def global_mean(value: jax.Array) -> jax.Array:
        return jax.lax.pmean(value, axis_name) if axis_name is not None else value

    num_positives = global_mean(jnp.sum(positive).astype(jnp.float32))
    positive_normaliser = jnp.maximum(num_positives, 1.0)

    predicted = box_lib.decode_regression(regression, anchors, anchor_strides, box_regression, box_coder)
    one_hot = jax.nn.one_hot(matched_labels, num_classes) * positive[..., None]
    if config.classification == "focal":
        per_class = sigmoid_focal_loss(class_logits, one_hot, config.focal_alpha, config.focal_gamma)
    else:
        if quality_targets is None:
            quality_targets = box_lib.elementwise_iou(jax.lax.stop_gradient(predicted), matched_boxes)
        soft = one_hot * jnp.where(positive, quality_targets, 0.0)[..., None]
        if config.classification == "quality_focal":
            per_class = quality_focal_loss(class_logits, soft, config.quality_beta)
        else:
            per_class = varifocal_loss(class_logits, soft, config.varifocal_alpha, config.varifocal_gamma)
    classification = jnp.sum(jnp.where(counted[..., None], per_class, 0.0)) / positive_normaliser

    points = box_lib.box_centers(anchors)
    center_target = jnp.where(positive, centerness_targets(points, matched_boxes), 0.0)
    if config.box_loss == "giou":
        per_anchor = 1.0 - box_lib.elementwise_giou(predicted, matched_boxes)
    else:
        target_deltas = box_lib.encode_deltas(anchors, matched_boxes)
        per_anchor = jnp.sum(_smooth_l1(box_regression - target_deltas, config.smooth_l1_beta), axis=-1)
    per_anchor = jnp.where(positive, per_anchor, 0.0)
    if use_centerness:
        weight_normaliser = global_mean(jnp.sum(center_target))
        box = jnp.sum(per_anchor * center_target) / jnp.maximum(weight_normaliser, 1e-6)
        center_bce = optax.losses.sigmoid_binary_cross_entropy(centerness_logits, center_target)
        centerness = jnp.sum(jnp.where(positive, center_bce, 0.0)) / positive_normaliser
    else:
        box = jnp.sum(per_anchor) / positive_normaliser
        centerness = jnp.zeros((), class_logits.dtype)
    box = config.box_loss_weight * box
    return LossTerms(
        classification=classification,
        box=box,
        centerness=centerness,
        total=classification + box + centerness,
        num_positives=num_positives,
    )
