"""Static anchor grids over the FPN levels, and per-image anchor validity.

The grid depends only on the canvas shape and the config, so it is built once in numpy at trace
time and enters the jitted step as a constant. Anchors are flattened level by level (P3 first) and,
within a level, in ``(y, x, anchor)`` order, so each level is a contiguous slice of length
``level_sizes[l] = height_l * width_l * anchors_per_location``.

For anchor-free (FCOS-style) detectors the "anchors" are points: a grid with one square anchor of
side ``8 * stride`` per location (``octave_base_scale=8, scales=(1,), aspect_ratios=(1,)``); its
boxes are used only to assign targets, its centres are the points.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


def feature_size(size: int, stride: int) -> int:
    """Length of a feature map at ``stride`` for an input of ``size`` pixels.

    Every stride-2 layer of the backbone and FPN (convs and pooling with SAME padding) maps ``n`` to
    ``ceil(n / 2)``, so e.g. 800 pixels give 100, 50, 25, 13, 7 at strides 8 to 128.
    """
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"stride must be a power of two, got {stride}")
    if size < 1:
        raise ValueError(f"feature_size needs a positive input size, got {size}")
    while stride > 1:
        size = -(-size // 2)
        stride //= 2
    return size


@dataclasses.dataclass(frozen=True, eq=False)
class AnchorGrid:
    """Anchors of every FPN level for one canvas.

    Attributes:
      canvas: (height, width) of the padded input image in pixels.
      strides: stride of each level, e.g. (8, 16, 32, 64, 128) for P3-P7.
      level_shapes: (height, width) of each level's feature map.
      anchors_per_location: anchors at each feature-map cell (scales x aspect ratios).
      boxes: ``[A, 4]`` float32 xyxy pixels.
    """

    canvas: tuple[int, int]
    strides: tuple[int, ...]
    level_shapes: tuple[tuple[int, int], ...]
    anchors_per_location: int
    boxes: np.ndarray

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Number of anchors in each level (static)."""
        return tuple(h * w * self.anchors_per_location for h, w in self.level_shapes)

    @property
    def num_anchors(self) -> int:
        return self.boxes.shape[0]

    @property
    def centers(self) -> np.ndarray:
        """``[A, 2]`` float32 (x, y) anchor centres: ``((x + offset) * stride, (y + offset) * stride)``, offset 0.5 by
        default."""
        return (self.boxes[:, :2] + self.boxes[:, 2:]) * np.float32(0.5)

    @property
    def anchor_strides(self) -> np.ndarray:
        """``[A]`` float32 stride of each anchor's level."""
        return np.repeat(np.asarray(self.strides, np.float32), self.level_sizes)


@functools.lru_cache(maxsize=32)
def _anchor_grid(
    canvas: tuple[int, int],
    strides: tuple[int, ...],
    octave_base_scale: float,
    scales: tuple[float, ...],
    aspect_ratios: tuple[float, ...],
    center_offset: float,
) -> AnchorGrid:
    # Anchor shapes at one location, ratio-major then scale (mmdetection's order); ratio = h / w.
    ratios = np.asarray(aspect_ratios, np.float64)
    scale_factors = np.asarray(scales, np.float64)
    h_factor = np.sqrt(ratios)[:, None] * scale_factors[None, :]
    w_factor = (1.0 / np.sqrt(ratios))[:, None] * scale_factors[None, :]
    level_shapes, level_boxes = [], []
    for stride in strides:
        height, width = feature_size(canvas[0], stride), feature_size(canvas[1], stride)
        base = octave_base_scale * stride
        # Half-sizes on a 1/256 px grid keep x1 + x2 exact in float32, so every anchor of a location
        # has exactly the location's centre and distance ties between them are exact ties.
        half_w = np.round((0.5 * base * w_factor).reshape(-1) * 256.0) / 256.0
        half_h = np.round((0.5 * base * h_factor).reshape(-1) * 256.0) / 256.0
        cy, cx = np.meshgrid((np.arange(height) + center_offset) * stride, (np.arange(width) + center_offset) * stride,
                             indexing="ij")
        cx, cy = cx[:, :, None], cy[:, :, None]
        boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)
        level_shapes.append((height, width))
        level_boxes.append(boxes.reshape(-1, 4))
    all_boxes = np.concatenate(level_boxes).astype(np.float32)
    all_boxes.setflags(write=False)
    return AnchorGrid(
        canvas=canvas,
        strides=strides,
        level_shapes=tuple(level_shapes),
        anchors_per_location=len(ratios) * len(scale_factors),
        boxes=all_boxes,
    )


def make_anchor_grid(
    canvas: Sequence[int],
    strides: Sequence[int],
    octave_base_scale: float,
    scales: Sequence[float],
    aspect_ratios: Sequence[float],
    center_offset: float = 0.5,
) -> AnchorGrid:
    """Builds (and caches) the anchors for a canvas.

    Args:
      canvas: (height, width) in pixels.
      strides: level strides, powers of two.
      octave_base_scale: anchor side in strides at scale 1 (ATSS and FCOS: 8).
      scales: size multipliers per location, e.g. ``(1,)`` or RetinaNet's ``(2**0, 2**(1/3), 2**(2/3))``.
      aspect_ratios: height / width ratios per location, e.g. ``(1,)`` or ``(0.5, 1, 2)``.
      center_offset: anchor centres at ``(x + center_offset) * stride`` (0.5: the cell's centre, the official
        code; 0: its corner, mmdetection's ``AnchorGenerator``).

    Returns:
      The grid; an anchor's size is ``octave_base_scale * stride * scale`` (the side of the square
      of equal area) for every aspect ratio x scale.
    """
    canvas = tuple(int(s) for s in canvas)
    if len(canvas) != 2 or min(canvas) < 1:
        raise ValueError(f"canvas must be (height, width) with positive sides, got {canvas}")
    if not scales or not aspect_ratios or min(scales) <= 0 or min(aspect_ratios) <= 0:
        raise ValueError(f"scales {scales} and aspect_ratios {aspect_ratios} must be positive")
    return _anchor_grid(
        canvas,
        tuple(int(s) for s in strides),
        float(octave_base_scale),
        tuple(float(s) for s in scales),
        tuple(float(r) for r in aspect_ratios),
        float(center_offset),
    )


def anchors_per_location(config: ml_collections.ConfigDict) -> int:
    """#A of ``config`` (the ``anchors`` section): one anchor per scale and aspect ratio."""
    return len(config.scales) * len(config.aspect_ratios)


def build_anchor_grid(config: ml_collections.ConfigDict, canvas: Sequence[int]) -> AnchorGrid:
    """The anchors of ``config`` (the ``anchors`` section of the experiment config) on ``canvas``."""
    return make_anchor_grid(canvas, tuple(config.strides), config.octave_base_scale, tuple(config.scales),
                            tuple(config.aspect_ratios), config.center_offset)


def anchor_valid_mask(centers: jax.Array | np.ndarray, image_size: jax.Array, pad_divisor: int = 1) -> jax.Array:
    """Anchors whose centre lies inside the resized image (the canvas may be padded beyond it), its size first
    rounded up to a multiple of ``pad_divisor`` (32: the padded input mmdetection's and the official heads see).

    Args:
      centers: ``[A, 2]`` float32 (x, y) anchor centres.
      image_size: ``[..., 2]`` int32 (height, width) of the resized image inside the canvas.
      pad_divisor: 1 for the image alone.

    Returns:
      ``[..., A]`` bool.
    """
    size = jnp.asarray(image_size, jnp.float32)[..., None, :]
    size = jnp.ceil(size / pad_divisor) * pad_divisor
    centers = jnp.asarray(centers, jnp.float32)
    return (centers[:, 0] < size[..., 1]) & (centers[:, 1] < size[..., 0])
