"""The ATSS assigner against the per-box loop reference and hand-computed cases."""

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atss_jax.assigners import NEGATIVE, build_assigner
from atss_jax.assigners.atss import atss_assign
from configs import demo
from tests import cases
from tests.cases import paper_grid
from tests.reference_assigners import atss_reference

CANVAS = (96, 128)


def _paper_settings(grid):
    """atss_assign's keyword arguments for ``grid`` with the paper's k = 9 and 0.01 px centre margin."""
    return {"level_sizes": grid.level_sizes, "topk": 9, "anchors_per_location": grid.anchors_per_location,
            "center_eps": 0.01}
NINE_ANCHORS = dict(scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)), aspect_ratios=(0.5, 1.0, 2.0))


@pytest.mark.parametrize(
    "anchor_kwargs, topk, count, seed",
    [
        ({}, 9, 140, 0),
        ({}, 1, 70, 1),
        ({}, 25, 70, 2),
        ({}, 4, 70, 3),
        (NINE_ANCHORS, 9, 35, 4),
        (NINE_ANCHORS, 2, 21, 5),
    ],
)
def test_matches_loop_reference_on_random_cases(anchor_kwargs, topk, count, seed):
    grid = paper_grid(CANVAS, **anchor_kwargs)
    batch_cases = cases.random_cases(seed, count, CANVAS, max_boxes=8)
    assign = functools.partial(
        atss_assign, grid.boxes, **{**_paper_settings(grid), "topk": topk}
    )
    anchor_valid, result = cases.run_batched(assign, grid, cases.stack(batch_cases))
    positives = 0
    for i, case in enumerate(batch_cases):
        gt_index, counts, thresholds = atss_reference(
            grid.boxes,
            anchor_valid[i],
            case.gt_boxes,
            case.gt_valid,
            grid.level_sizes,
            topk,
            grid.anchors_per_location,
            0.01,
        )
        kind = cases.KINDS[i % len(cases.KINDS)]
        np.testing.assert_array_equal(result.gt_index[i], gt_index, err_msg=f"case {i} ({kind})")
        np.testing.assert_array_equal(result.num_positives[i], counts, err_msg=f"case {i} ({kind})")
        np.testing.assert_allclose(result.iou_threshold[i], thresholds, atol=2e-6, err_msg=f"case {i} ({kind})")
        positives += counts.sum()
    assert positives > count  # the cases exercise real assignments, not only empty ones


def _single_level_grid():
    """A 4x4 grid of 8x8 anchors tiling a 32x32 canvas: centres at 4, 12, 20, 28."""
    return paper_grid((32, 32), strides=(8,), octave_base_scale=1.0)


def _assign_one(grid, gt_boxes, topk, center_eps=0.01, anchor_valid=None):
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    if anchor_valid is None:
        anchor_valid = jnp.ones((grid.num_anchors,), bool)
    return jax.jit(atss_assign, static_argnames=("level_sizes", "topk", "anchors_per_location", "center_eps"))(
        grid.boxes,
        anchor_valid,
        gt_boxes,
        jnp.ones(gt_boxes.shape[0], bool),
        level_sizes=grid.level_sizes,
        topk=topk,
        anchors_per_location=grid.anchors_per_location,
        center_eps=center_eps,
    )


def test_hand_computed_threshold():
    # Box [0, 0, 12, 12], centre (6, 6): the 4 nearest anchors are 0 (d^2 = 8), 1 and 4 (d^2 = 40), 5 (72).
    grid = _single_level_grid()
    result = _assign_one(grid, [[0.0, 0.0, 12.0, 12.0]], topk=4)
    ious = [64 / 144, 32 / 176, 32 / 176, 16 / 192]
    threshold = statistics.mean(ious) + statistics.stdev(ious)  # 0.3777: only anchor 0 passes
    assert float(result.iou_threshold[0]) == pytest.approx(threshold, rel=1e-5)
    assert np.flatnonzero(np.asarray(result.gt_index) == 0).tolist() == [0]
    assert result.num_positives.tolist() == [1]


def test_distance_ties_go_to_the_lower_anchor_index():
    # Box [0, 0, 16, 16], centre (8, 8): anchors 0, 1, 4, 5 are all at d^2 = 32. k = 3 keeps 0, 1, 4.
    grid = _single_level_grid()
    result = _assign_one(grid, [[0.0, 0.0, 16.0, 16.0]], topk=3)
    assert np.flatnonzero(np.asarray(result.gt_index) == 0).tolist() == [0, 1, 4]
    assert float(result.iou_threshold[0]) == pytest.approx(0.25)  # all IoUs 0.25, std 0


def test_conflicts_go_to_the_highest_iou_then_the_lowest_box_index():
    grid = _single_level_grid()
    # Box 1 fits anchor 0 exactly (IoU 1) and takes it from box 0 (IoU 0.25) despite its higher index.
    result = _assign_one(grid, [[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 8.0, 8.0]], topk=1)
    assert int(result.gt_index[0]) == 1
    # Identical boxes: every positive goes to the first one.
    result = _assign_one(grid, [[4.0, 4.0, 20.0, 20.0]] * 3, topk=4)
    assert result.num_positives.tolist()[1:] == [0, 0] and result.num_positives[0] > 0


def test_centre_margin_is_strict():
    grid = _single_level_grid()
    # Anchor 0's centre (4, 4) lies exactly 0.5 px inside the left edge x1 = 3.5: not more than 0.5.
    on_margin = _assign_one(grid, [[3.5, 0.0, 8.5, 8.0]], topk=1, center_eps=0.5)
    inside = _assign_one(grid, [[3.25, 0.0, 8.5, 8.0]], topk=1, center_eps=0.5)
    assert int(on_margin.gt_index[0]) == NEGATIVE and int(inside.gt_index[0]) == 0


def test_invalid_anchors_are_never_candidates():
    grid = _single_level_grid()
    valid = jnp.ones((16,), bool).at[0].set(False)
    # With anchor 0 invalid, the nearest valid anchor to (4, 4) is 1 (index tie with 4 broken low).
    result = _assign_one(grid, [[0.0, 0.0, 16.0, 16.0]], topk=1, anchor_valid=valid)
    assert np.flatnonzero(np.asarray(result.gt_index) == 0).tolist() == [1]
    none_valid = _assign_one(grid, [[0.0, 0.0, 16.0, 16.0]], topk=9, anchor_valid=jnp.zeros((16,), bool))
    assert (np.asarray(none_valid.gt_index) == NEGATIVE).all() and float(none_valid.iou_threshold[0]) == 0.0


@pytest.mark.parametrize(
    "gt_boxes",
    [
        [[10.0, 10.0, 10.0, 10.0]],  # a point
        [[10.0, 10.0, 10.0, 90.0]],  # zero width
        [[50.0, 50.0, 20.0, 20.0]],  # inverted
        [[-1e6, -1e6, 1e6, 1e6]],  # huge
        [[500.0, 500.0, 600.0, 700.0]],  # outside the canvas
        [[1.0, 1.0, 1.5, 1.5]],  # far smaller than any anchor
    ],
)
def test_degenerate_boxes_never_give_nan(gt_boxes):
    grid = paper_grid(CANVAS)
    result = _assign_one(grid, gt_boxes, topk=9)
    assert np.isfinite(np.asarray(result.iou_threshold)).all()
    gt_index = np.asarray(result.gt_index)
    assert ((gt_index == NEGATIVE) | (gt_index == 0)).all()
    expected, _, _ = atss_reference(
        grid.boxes,
        np.ones(grid.num_anchors, bool),
        np.asarray(gt_boxes, np.float32),
        [True],
        grid.level_sizes,
        9,
        1,
        0.01,
    )
    np.testing.assert_array_equal(gt_index, expected)


def test_zero_boxes_and_all_padding():
    grid = paper_grid(CANVAS)
    valid = jnp.ones((grid.num_anchors,), bool)
    empty = atss_assign(grid.boxes, valid, jnp.zeros((0, 4)), jnp.zeros((0,), bool), **_paper_settings(grid))
    assert empty.gt_index.shape == (grid.num_anchors,) and (np.asarray(empty.gt_index) == NEGATIVE).all()
    padded = atss_assign(
        grid.boxes,
        valid,
        jnp.full((5, 4), 20.0).at[:, 2:].set(60.0),
        jnp.zeros((5,), bool),
        **_paper_settings(grid),
    )
    assert (np.asarray(padded.gt_index) == NEGATIVE).all() and padded.num_positives.tolist() == [0] * 5


def test_bad_static_arguments_are_named():
    grid = paper_grid(CANVAS)
    with pytest.raises(ValueError, match="level_sizes"):
        atss_assign(
            grid.boxes, jnp.ones(grid.num_anchors, bool), jnp.zeros((1, 4)), jnp.ones(1, bool),
            **{**_paper_settings(grid), "level_sizes": (1, 2)},
        )
    with pytest.raises(ValueError, match="topk"):
        atss_assign(
            grid.boxes,
            jnp.ones(grid.num_anchors, bool),
            jnp.zeros((1, 4)),
            jnp.ones(1, bool),
            **{**_paper_settings(grid), "topk": 0},
        )


def test_build_assigner_from_config_and_override():
    config = demo.get_config("tiny")
    grid = paper_grid(config.data.canvas)
    batch_cases = cases.random_cases(7, 6, config.data.canvas, config.data.max_boxes)
    with config.unlocked():
        config.assigner.topk = 5
    anchor_valid, result = cases.run_batched(
        build_assigner(config.assigner, grid), grid, cases.stack(batch_cases), per_image=False
    )
    for i, case in enumerate(batch_cases):
        expected, _, _ = atss_reference(
            grid.boxes, anchor_valid[i], case.gt_boxes, case.gt_valid, grid.level_sizes, 5, 1, 0.01
        )
        np.testing.assert_array_equal(result.gt_index[i], expected)
    config.assigner.name = "nearest"
    with pytest.raises(ValueError, match="nearest"):
        build_assigner(config.assigner, grid)
