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
# RetinaNet's thresholds, with its low-quality matches.
RETINANET = {"pos_iou_thr": 0.5, "neg_iou_thr": 0.4, "low_quality_matches": True}


@pytest.mark.parametrize("low_quality_matches", [True, False])
@pytest.mark.parametrize(
    "anchor_kwargs, count",
    [({}, 84), (dict(scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)), aspect_ratios=(0.5, 1.0, 2.0)), 21)],
)
def test_matches_loop_reference_on_random_cases(anchor_kwargs, count, low_quality_matches):
    # RetinaNet's anchors are 4 strides wide; smaller anchors give overlaps in every IoU band.
    grid = paper_grid(CANVAS, octave_base_scale=4.0, **anchor_kwargs)
    batch_cases = cases.random_cases(11, count, CANVAS, max_boxes=6)
    assign = functools.partial(max_iou_assign, grid.boxes, pos_iou_thr=0.5, neg_iou_thr=0.4,
                               low_quality_matches=low_quality_matches)
    anchor_valid, result = cases.run_batched(assign, grid, cases.stack(batch_cases))
    for i, case in enumerate(batch_cases):
        expected = max_iou_reference(
            grid.boxes, anchor_valid[i], case.gt_boxes, case.gt_valid, 0.5, 0.4, low_quality_matches
        )
        np.testing.assert_array_equal(result.gt_index[i], expected, err_msg=f"case {i}")
        np.testing.assert_array_equal(result.num_positives[i], [np.sum(expected == g) for g in range(6)])
    assert (result.gt_index == IGNORED).any() and (result.gt_index >= 0).any()


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
        max_iou_assign(grid.boxes, jnp.ones((16,), bool), gt, jnp.ones(1, bool), pos_iou_thr=0.3, neg_iou_thr=0.4,
                       low_quality_matches=True)
