"""Random assignment problems shared by the assigner tests: padded boxes of every awkward kind."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from atss_jax.anchors import AnchorGrid, make_anchor_grid
from configs import base

KINDS = ("coco", "extreme_ratio", "partly_outside", "duplicates", "integer", "tiny", "crowded")


class Case(NamedTuple):
    gt_boxes: np.ndarray  # [G, 4] float32
    gt_valid: np.ndarray  # [G] bool
    image_size: np.ndarray  # [2] int32 (height, width)


def random_image_size(rng: np.random.Generator, canvas: tuple[int, int]) -> np.ndarray:
    """Full canvas, a random part of it, a sliver (fewer valid anchors than k), or nothing at all."""
    height, width = canvas
    choice = rng.integers(5)
    if choice == 0:
        return np.array([height, width], np.int32)
    if choice == 1:
        return np.array([rng.integers(1, 13), rng.integers(1, 13)], np.int32)
    if choice == 2 and rng.random() < 0.25:
        return np.array([0, 0], np.int32)
    return np.array([rng.integers(height // 4, height + 1), rng.integers(width // 4, width + 1)], np.int32)


def random_case(rng: np.random.Generator, canvas: tuple[int, int], max_boxes: int, kind: str) -> Case:
    """Boxes inside ``image_size`` mostly, COCO-like sizes (4 px to the whole image), padded to G."""
    image_size = random_image_size(rng, canvas)
    extent = np.maximum(image_size[::-1], 1).astype(np.float64)  # (width, height)
    num = max_boxes if rng.random() < 0.2 else int(rng.integers(0, max_boxes + 1))
    size = np.exp(rng.uniform(np.log(4.0), np.log(max(extent.max(), 5.0)), num))
    ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3), num))
    if kind == "extreme_ratio":
        ratio = np.exp(rng.uniform(np.log(1 / 12), np.log(12), num))
    if kind == "tiny":
        size = rng.uniform(0.0, 6.0, num)
    wh = np.stack([size / np.sqrt(ratio), size * np.sqrt(ratio)], axis=-1)
    low, high = (-0.3, 1.3) if kind == "partly_outside" else (0.0, 1.0)
    center = rng.uniform(low, high, (num, 2)) * extent
    if kind == "crowded":
        center = extent * 0.5 + rng.normal(0.0, 8.0, (num, 2))
    boxes = np.concatenate([center - wh / 2, center + wh / 2], axis=-1)
    if kind == "integer":
        boxes = np.round(boxes)
    if kind == "duplicates" and num > 1:
        boxes[num // 2 :] = boxes[: num - num // 2]
    gt_boxes = np.zeros((max_boxes, 4), np.float32)
    gt_boxes[:num] = boxes
    gt_valid = np.arange(max_boxes) < num
    # Padding holds garbage on purpose: it must be ignored, not trusted to be zeros.
    gt_boxes[num:] = rng.uniform(-50, 200, (max_boxes - num, 4))
    return Case(gt_boxes, gt_valid, image_size)


def random_cases(seed: int, count: int, canvas: tuple[int, int], max_boxes: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    return [random_case(rng, canvas, max_boxes, KINDS[i % len(KINDS)]) for i in range(count)]


def stack(cases: list[Case]) -> Case:
    return Case(*(np.stack(field) for field in zip(*cases)))


def run_batched(assign, grid, batch: Case, per_image: bool = True):
    """Runs ``assign(anchor_valid, gt_boxes, gt_valid)`` jitted over a batch (vmapped if per image).

    Returns the numpy anchor-valid mask ``[B, A]`` and the numpy ``AssignResult``.
    """
    import jax

    from atss_jax.anchors import anchor_valid_mask

    anchor_valid = anchor_valid_mask(grid.centers, batch.image_size)
    result = jax.jit(jax.vmap(assign) if per_image else assign)(anchor_valid, batch.gt_boxes, batch.gt_valid)
    return np.asarray(anchor_valid), jax.tree.map(np.asarray, result)


def paper_grid(canvas: tuple[int, int], **overrides) -> AnchorGrid:
    """The anchors of configs/base.py (the paper's: strides 8-128, one 8-stride square per location) on
    ``canvas``, with ``make_anchor_grid`` keyword arguments overridden."""
    anchors = base.get_config().anchors
    settings = {"strides": tuple(anchors.strides), "octave_base_scale": anchors.octave_base_scale,
                "scales": tuple(anchors.scales), "aspect_ratios": tuple(anchors.aspect_ratios)}
    return make_anchor_grid(canvas, **{**settings, **overrides})
