"""FCOS assignment (plain and centre sampling) against the loop reference and hand cases."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from atss_jax.assigners import NEGATIVE
from atss_jax.assigners.fcos import fcos_assign
from configs import base
from tests import cases
from tests.cases import paper_grid
from tests.reference_assigners import fcos_reference

CANVAS = (96, 128)
FCOS_REGRESS_RANGES = tuple(tuple(r) for r in base.get_config().assigner.regress_ranges)
# Ranges scaled to the small canvas so that every level receives boxes.
SMALL_RANGES = ((0.0, 8.0), (8.0, 16.0), (16.0, 32.0), (32.0, 64.0), (64.0, float("inf")))


@pytest.mark.parametrize("radius", [None, 1.5, 0.5])
@pytest.mark.parametrize("ranges", [FCOS_REGRESS_RANGES, SMALL_RANGES])
def test_matches_loop_reference_on_random_cases(radius, ranges):
    grid = paper_grid(CANVAS)
    batch_cases = cases.random_cases(21, 56, CANVAS, max_boxes=8)
    assign = functools.partial(
        fcos_assign,
        grid.boxes,
        level_sizes=grid.level_sizes,
        level_strides=grid.strides,
        regress_ranges=ranges,
        center_sampling_radius=radius,
    )
    anchor_valid, result = cases.run_batched(assign, grid, cases.stack(batch_cases))
    for i, case in enumerate(batch_cases):
        expected = fcos_reference(
            grid.boxes, anchor_valid[i], case.gt_boxes, case.gt_valid, grid.level_sizes, grid.strides, ranges, radius
        )
        np.testing.assert_array_equal(result.gt_index[i], expected, err_msg=f"case {i}")
    assert (result.gt_index >= 0).sum() > 56


def test_hand_computed_scale_and_smallest_box():
    grid = paper_grid((64, 64), strides=(8, 16))  # level 0: 8x8 points, level 1: 4x4 points
    gt = jnp.array([[0.0, 0.0, 64.0, 64.0], [8.0, 8.0, 24.0, 24.0]])
    result = fcos_assign(
        grid.boxes,
        jnp.ones(grid.num_anchors, bool),
        gt,
        jnp.ones(2, bool),
        level_sizes=grid.level_sizes,
        level_strides=grid.strides,
        regress_ranges=((0.0, 32.0), (32.0, 64.0)),
    )
    gt_index = np.asarray(result.gt_index)
    # Point (12, 12) of level 0 (index 1 * 8 + 1 = 9) is inside both boxes; its reach to the big
    # box is 52 > 32, to the small one 12: it goes to the small box.
    assert gt_index[9] == 1
    # Level 1 point (24, 24) (index 64 + 5): reach 40 to the big box, in [32, 64]; the small box's
    # edge passes through it, so it is not strictly inside that one.
    assert gt_index[64 + 5] == 0
    # Level 0 point (4, 4): inside the big box only, reach 60 > 32 -> negative at this level.
    assert gt_index[0] == NEGATIVE


def test_centre_sampling_shrinks_the_region():
    grid = paper_grid((64, 64), strides=(8,))
    gt = jnp.array([[0.0, 0.0, 64.0, 64.0]])
    kwargs = dict(level_sizes=grid.level_sizes, level_strides=grid.strides, regress_ranges=((0.0, float("inf")),))
    valid = jnp.ones(grid.num_anchors, bool)
    plain = fcos_assign(grid.boxes, valid, gt, jnp.ones(1, bool), **kwargs)
    sampled = fcos_assign(grid.boxes, valid, gt, jnp.ones(1, bool), center_sampling_radius=1.5, **kwargs)
    assert int(plain.num_positives[0]) == 64
    # Region: centre (32, 32) +- 12 px -> points at 28 and 36 on each axis.
    assert int(sampled.num_positives[0]) == 4


def test_level_arguments_must_agree():
    grid = paper_grid((64, 64), strides=(8, 16))
    with pytest.raises(ValueError, match="one entry per level"):
        fcos_assign(
            grid.boxes,
            jnp.ones(grid.num_anchors, bool),
            jnp.zeros((1, 4)),
            jnp.ones(1, bool),
            level_sizes=grid.level_sizes,
            level_strides=grid.strides,
            regress_ranges=FCOS_REGRESS_RANGES,  # five levels' ranges for a two-level grid
        )
