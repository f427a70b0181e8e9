"""RetinaNet's max-IoU assigner against the loop reference and a hand-computed case."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from atss_jax.assigners import IGNORED, NEGATIVE
from atss_jax.assigners.max_iou import max_iou_assign
from tests import cases
from tests.cases import paper_grid
from tests.reference_assigners import max_iou_reference

CANVAS = (64, 96)
# RetinaNet's thresholds, with its low-quality matches; without the paper's "In GT Box".
RETINANET = {"pos_iou_thr": 0.5, "neg_iou_thr": 0.4, "low_quality_matches": True, "in_gt_box": False,
             "center_eps": 0.01}


@pytest.mark.parametrize("low_quality_matches, in_gt_box", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize(
    "anchor_kwargs, count",
    [({}, 84), (dict(scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)), aspect_ratios=(0.5, 1.0, 2.0)), 21)],
)
def test_matches_loop_reference_on_random_cases(anchor_kwargs, count, low_quality_matches, in_gt_box):
    # RetinaNet's anchors are 4 strides wide; smaller anchors give overlaps in every IoU band.
    grid = paper_grid(CANVAS, octave_base_scale=4.0, **anchor_kwargs)
    batch_cases = cases.random_cases(11, count, CANVAS, max_boxes=6)
    options = {**RETINANET, "low_quality_matches": low_quality_matches}
    assign = functools.partial(max_iou_assign, grid.boxes, **{**options, "in_gt_box": in_gt_box})
    anchor_valid, result = cases.run_batched(assign, grid, cases.stack(batch_cases))
    _, without = cases.run_batched(functools.partial(max_iou_assign, grid.boxes, **options), grid,
                                   cases.stack(batch_cases))
    for i, case in enumerate(batch_cases):
        expected = max_iou_reference(
            grid.boxes, anchor_valid[i], case.gt_boxes, case.gt_valid, 0.5, 0.4, low_quality_matches, in_gt_box, 0.01
        )
        np.testing.assert_array_equal(result.gt_index[i], expected, err_msg=f"case {i}")
        np.testing.assert_array_equal(result.num_positives[i], [np.sum(expected == g) for g in range(6)])
    assert (result.gt_index == IGNORED).any() and (result.gt_index >= 0).any()
    # In GT Box only turns positives into ignored anchors, and here it does turn some.
    changed = result.gt_index != without.gt_index
    assert (changed.any() == in_gt_box) and (result.gt_index[changed] == IGNORED).all()
    assert (without.gt_index[changed] >= 0).all()


def test_hand_computed_bands_and_low_quality_match():
    grid = paper_grid((32, 32), strides=(8,), octave_base_scale=2.0)  # 16x16 anchors, centres 4..28
    # Anchor 5 is [4, 4, 20, 20]. Box A = [4, 4, 20, 24]: IoU 256/320 = 0.8 -> positive.
    # Box B = [0, 20, 6, 30], far from every anchor's shape: best IoU < 0.4, kept as a low-quality match.
    gt = jnp.array([[4.0, 4.0, 20.0, 24.0], [0.0, 20.0, 6.0, 30.0]])
    valid = jnp.ones((16,), bool)
    without = max_iou_assign(grid.boxes, valid, gt, jnp.ones(2, bool), **{**RETINANET, "low_quality_matches": False})
    with_lq = max_iou_assign(grid.boxes, valid, gt, jnp.ones(2, bool), **RETINANET)
    assert int(without.gt_index[5]) == 0
    assert int(without.num_positives[1]) == 0 and int(with_lq.num_positives[1]) >= 1
    # Anchor 1 is [4, -4, 20, 12]: IoU with A = 128/384 = 1/3 < 0.4 -> negative; anchor 6 [12, 4, 28, 20]:
    # IoU with A = 128 / (256 + 320 - 128) = 0.2857 -> negative. An anchor in the 0.4-0.5 band is ignored:
    band = jnp.array([[4.0, 4.0, 20.0, 20.0 + 16.0 * 1.2]])  # IoU with anchor 5 = 256 / 563.2 = 0.4545
    ignored = max_iou_assign(grid.boxes, valid, band, jnp.ones(1, bool), **{**RETINANET, "low_quality_matches": False})
    assert int(without.gt_index[1]) == NEGATIVE and int(without.gt_index[6]) == NEGATIVE
    assert int(ignored.gt_index[5]) == IGNORED


def test_no_boxes_and_invalid_anchors_are_negative():
    grid = paper_grid((32, 32), strides=(8,), octave_base_scale=2.0)
    gt = jnp.array([[4.0, 4.0, 20.0, 20.0]])
    result = max_iou_assign(grid.boxes, jnp.zeros((16,), bool), gt, jnp.ones(1, bool), **RETINANET)
    assert (np.asarray(result.gt_index) == NEGATIVE).all()
    result = max_iou_assign(grid.boxes, jnp.ones((16,), bool), gt, jnp.zeros(1, bool), **RETINANET)
    assert (np.asarray(result.gt_index) == NEGATIVE).all()
    with pytest.raises(ValueError, match="neg_iou_thr"):
        max_iou_assign(grid.boxes, jnp.ones((16,), bool), gt, jnp.ones(1, bool),
                       **{**RETINANET, "pos_iou_thr": 0.3})


def test_hand_computed_in_gt_box():
    """A 6 x 6 box between four anchor centres, and a box whose best anchor's centre is 0.005 px inside it."""
    grid = paper_grid((32, 32), strides=(8,), octave_base_scale=2.0)  # 16x16 anchors, centres 4, 12, 20, 28
    valid = jnp.ones((16,), bool)
    in_gt_box = {**RETINANET, "in_gt_box": True}
    # [13, 13, 19, 19] lies inside anchors 5, 6, 9, 10 (centres (12 or 20, 12 or 20)): IoU 36 / 256 each, all
    # tied as its best, so all four are low-quality positives, and none has its centre inside the box.
    small = jnp.array([[13.0, 13.0, 19.0, 19.0]])
    plain = max_iou_assign(grid.boxes, valid, small, jnp.ones(1, bool), **RETINANET)
    inside = max_iou_assign(grid.boxes, valid, small, jnp.ones(1, bool), **in_gt_box)
    assert sorted(np.flatnonzero(np.asarray(plain.gt_index) == 0)) == [5, 6, 9, 10]
    assert sorted(np.flatnonzero(np.asarray(inside.gt_index) == IGNORED)) == [5, 6, 9, 10]  # ignored, not negative
    assert int(inside.num_positives[0]) == 0
    # [11.995, 11.995, 20, 20]: anchor 5 = [4, 4, 20, 20] has IoU 8.005^2 / 256 = 0.2503, anchor 10 =
    # [12, 12, 28, 28] 64 / 256.08 = 0.2499: anchor 5 is its only low-quality match, its centre (12, 12) is
    # 0.005 px inside: ignored with the official 0.01, positive with 0.001.
    edge = jnp.array([[11.995, 11.995, 20.0, 20.0]])
    assert int(max_iou_assign(grid.boxes, valid, edge, jnp.ones(1, bool), **in_gt_box).gt_index[5]) == IGNORED
    loose = max_iou_assign(grid.boxes, valid, edge, jnp.ones(1, bool), **{**in_gt_box, "center_eps": 0.001})
    assert np.flatnonzero(np.asarray(loose.gt_index) >= 0).tolist() == [5]
    # A centred positive stays: [4, 4, 20, 20] is anchor 5 itself.
    exact = max_iou_assign(grid.boxes, valid, jnp.array([[4.0, 4.0, 20.0, 20.0]]), jnp.ones(1, bool), **in_gt_box)
    assert np.flatnonzero(np.asarray(exact.gt_index) >= 0).tolist() == [5]
