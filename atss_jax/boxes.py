"""Box geometry and box coders, pure jnp.

Conventions: boxes are ``[..., 4]`` float32 ``(x1, y1, x2, y2)`` in continuous pixel coordinates,
so a box's width is ``x2 - x1`` (no "+1", as pycocotools and mmdetection v2+). Every function
broadcasts over leading dimensions and is safe to jit and vmap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

# Keeps divisions finite for degenerate (zero-area) boxes without moving any real IoU.
_EPS = 1e-9
DELTA_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# What the head regresses: "box" deltas from anchors, or "point" LTRB distances in strides.
REGRESSIONS = ("box", "point")
# Largest log-scale a delta may decode to: a box at most 1000/16 times its anchor (Detectron's clamp).
DELTA_SCALE_CLAMP = math.log(1000.0 / 16.0)
# How "box" deltas decode: "official" clamps the log-scale from above only; "mmdetection" (its
# DeltaXYWHBBoxCoder, wh_ratio_clip 16/1000) from both sides.
BOX_CODERS = ("official", "mmdetection")


def xyxy_to_cxcywh(boxes: jax.Array) -> jax.Array:
    """``boxes: [..., 4] xyxy -> [..., 4] (cx, cy, w, h)``."""
    x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([(x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1], axis=-1)


def cxcywh_to_xyxy(boxes: jax.Array) -> jax.Array:
    """``boxes: [..., 4] (cx, cy, w, h) -> [..., 4] xyxy``."""
    cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
    return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_centers(boxes: jax.Array) -> jax.Array:
    """``boxes: [..., 4] xyxy -> [..., 2] (cx, cy)``."""
    return (boxes[..., :2] + boxes[..., 2:]) * 0.5


def box_area(boxes: jax.Array) -> jax.Array:
    """``boxes: [..., 4] xyxy -> [...]``; inverted boxes have area 0."""
    wh = jnp.maximum(boxes[..., 2:] - boxes[..., :2], 0.0)
    return wh[..., 0] * wh[..., 1]


def _intersection_union(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Broadcasting intersection and union areas of ``a [..., 4]`` and ``b [..., 4]``."""
    top_left = jnp.maximum(a[..., :2], b[..., :2])
    bottom_right = jnp.minimum(a[..., 2:], b[..., 2:])
    wh = jnp.maximum(bottom_right - top_left, 0.0)
    intersection = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - intersection
    return intersection, union


def elementwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """IoU of matching boxes: ``a [..., 4], b [..., 4]`` (broadcastable) ``-> [...]`` in [0, 1]."""
    intersection, union = _intersection_union(a, b)
    return intersection / jnp.maximum(union, _EPS)


def pairwise_iou(a: jax.Array, b: jax.Array) -> jax.Array:
    """IoU of every pair: ``a [N, 4], b [M, 4] -> [N, M]``."""
    return elementwise_iou(a[:, None, :], b[None, :, :])


def elementwise_giou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Generalised IoU of matching boxes: ``a [..., 4], b [..., 4] -> [...]`` in [-1, 1].

    ``GIoU = IoU - (C - U) / C`` with ``C`` the area of the smallest box enclosing both.
    """
    intersection, union = _intersection_union(a, b)
    iou = intersection / jnp.maximum(union, _EPS)
    enclosing_wh = jnp.maximum(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), 0.0)
    enclosing = enclosing_wh[..., 0] * enclosing_wh[..., 1]
    return iou - (enclosing - union) / jnp.maximum(enclosing, _EPS)


def clip_boxes(boxes: jax.Array, image_size: jax.Array) -> jax.Array:
    """Clips ``boxes [..., 4]`` to ``[0, w] x [0, h]``; ``image_size [..., 2]`` is (height, width)."""
    image_size = jnp.asarray(image_size, boxes.dtype)
    upper = jnp.stack([image_size[..., 1], image_size[..., 0]], axis=-1)
    upper = jnp.concatenate([upper, upper], axis=-1)
    return jnp.clip(boxes, 0.0, upper)


def encode_deltas(anchors: jax.Array, boxes: jax.Array, weights: Sequence[float] = DELTA_WEIGHTS) -> jax.Array:
    """Regression targets of ``boxes`` relative to ``anchors`` (Faster R-CNN parametrisation).

    Args:
      anchors: ``[..., 4]`` xyxy, positive width and height.
      boxes: ``[..., 4]`` xyxy, broadcastable with ``anchors``.
      weights: ``(wx, wy, ww, wh)`` multipliers, (10, 10, 5, 5) = mmdetection's stds (0.1, 0.1, 0.2, 0.2).

    Returns:
      ``[..., 4]`` ``(wx * dx / w_a, wy * dy / h_a, ww * log(w / w_a), wh * log(h / h_a))``. A
      degenerate box gets a large negative, finite, log-size instead of ``-inf``.
    """
    anchor_cxcywh = xyxy_to_cxcywh(anchors)
    box_cxcywh = xyxy_to_cxcywh(boxes)
    wx, wy, ww, wh = weights
    offset = (box_cxcywh[..., :2] - anchor_cxcywh[..., :2]) / anchor_cxcywh[..., 2:]
    log_scale = jnp.log(jnp.maximum(box_cxcywh[..., 2:], _EPS) / anchor_cxcywh[..., 2:])
    return jnp.stack(
        [wx * offset[..., 0], wy * offset[..., 1], ww * log_scale[..., 0], wh * log_scale[..., 1]],
        axis=-1,
    )


def decode_deltas(
    anchors: jax.Array,
    deltas: jax.Array,
    weights: Sequence[float] = DELTA_WEIGHTS,
    scale_clamp: float = DELTA_SCALE_CLAMP,
    clamp_below: bool = False,
) -> jax.Array:
    """Inverse of :func:`encode_deltas`: ``anchors [..., 4], deltas [..., 4] -> boxes [..., 4]``.

    The log-size deltas are clamped at ``scale_clamp`` so that an untrained head cannot overflow; with
    ``clamp_below`` also at ``-scale_clamp`` (mmdetection's coder).
    """
    anchor_cxcywh = xyxy_to_cxcywh(anchors)
    wx, wy, ww, wh = weights
    offset = deltas[..., :2] / jnp.asarray([wx, wy], deltas.dtype)
    log_scale = jnp.clip(deltas[..., 2:] / jnp.asarray([ww, wh], deltas.dtype),
                         min=-scale_clamp if clamp_below else None, max=scale_clamp)
    center = anchor_cxcywh[..., :2] + offset * anchor_cxcywh[..., 2:]
    size = anchor_cxcywh[..., 2:] * jnp.exp(log_scale)
    return cxcywh_to_xyxy(jnp.concatenate([center, size], axis=-1))


def encode_ltrb(points: jax.Array, boxes: jax.Array, stride: jax.Array | float) -> jax.Array:
    """Anchor-free targets: distances from ``points`` to the four sides of ``boxes``, in strides.

    Args:
      points: ``[..., 2]`` (x, y) pixels.
      boxes: ``[..., 4]`` xyxy pixels, broadcastable with ``points``.
      stride: scalar or ``[...]`` stride of each point's level.

    Returns:
      ``[..., 4]`` ``(left, top, right, bottom) / stride``; negative when the point is outside.
    """
    stride = jnp.asarray(stride, boxes.dtype)[..., None]
    left_top = points - boxes[..., :2]
    right_bottom = boxes[..., 2:] - points
    return jnp.concatenate([left_top, right_bottom], axis=-1) / stride


def decode_ltrb(points: jax.Array, distances: jax.Array, stride: jax.Array | float) -> jax.Array:
    """Inverse of :func:`encode_ltrb`: ``points [..., 2], distances [..., 4] -> boxes [..., 4]``."""
    stride = jnp.asarray(stride, distances.dtype)[..., None]
    pixels = distances * stride
    return jnp.concatenate([points - pixels[..., :2], points + pixels[..., 2:]], axis=-1)


def decode_regression(
    regression_type: str, anchors: jax.Array, anchor_strides: jax.Array, box_regression: jax.Array,
    box_coder: str = "official",
) -> jax.Array:
    """Boxes from the head's regression output: ``[..., A, 4] -> [..., A, 4]`` xyxy pixels.

    ``regression_type`` "box": deltas from ``anchors [A, 4]``, decoded as ``box_coder`` (one of
    ``BOX_CODERS``); "point": LTRB distances in strides from the anchors' centres, ``anchor_strides [A]``
    the level strides.
    """
    if box_coder not in BOX_CODERS:
        raise ValueError(f"box coder {box_coder!r} is not one of {BOX_CODERS}")
    if regression_type == "box":
        return decode_deltas(anchors, box_regression, clamp_below=box_coder == "mmdetection")
    if regression_type == "point":
        return decode_ltrb(box_centers(anchors), box_regression, anchor_strides)
    raise ValueError(f"regression type {regression_type!r} is not one of {REGRESSIONS}")
