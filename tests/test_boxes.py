"""Box geometry and coders against hand-computed values and plain-Python formulas."""

import math

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atss_jax import boxes as box_lib


def _python_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _python_giou(a, b):
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    inter_iou = _python_iou(a, b)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return inter_iou - (cw * ch - union) / (cw * ch)


def _random_boxes(rng, n, scale=100.0):
    xy = rng.uniform(0, scale, (n, 2))
    wh = rng.uniform(0.5, scale, (n, 2))
    return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


def test_conversions_round_trip_and_hand_values():
    boxes = jnp.array([[10.0, 20.0, 30.0, 60.0]])
    np.testing.assert_allclose(box_lib.xyxy_to_cxcywh(boxes), [[20.0, 40.0, 20.0, 40.0]])
    np.testing.assert_allclose(box_lib.cxcywh_to_xyxy(box_lib.xyxy_to_cxcywh(boxes)), boxes)
    np.testing.assert_allclose(box_lib.box_centers(boxes), [[20.0, 40.0]])
    np.testing.assert_allclose(box_lib.box_area(jnp.array([[0.0, 0.0, 2.0, 3.0], [5.0, 5.0, 4.0, 9.0]])), [6.0, 0.0])


def test_pairwise_iou_hand_cases():
    a = jnp.array([[0.0, 0.0, 10.0, 10.0]])
    b = jnp.array([[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 15.0, 10.0], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 5.0, 5.0]])
    np.testing.assert_allclose(box_lib.pairwise_iou(a, b), [[1.0, 50.0 / 150.0, 0.0, 0.25]], rtol=1e-6)


def test_pairwise_iou_matches_python_loop():
    rng = np.random.default_rng(0)
    a, b = _random_boxes(rng, 37), _random_boxes(rng, 23)
    expected = np.array([[_python_iou(x, y) for y in b.astype(np.float64)] for x in a.astype(np.float64)])
    got = box_lib.pairwise_iou(jnp.asarray(a), jnp.asarray(b))
    assert got.shape == (37, 23)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_giou_hand_cases_and_loop():
    a = jnp.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = jnp.array([[2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    # Disjoint: IoU 0, enclosing 3, union 2 -> -1/3. Identical -> 1.
    np.testing.assert_allclose(box_lib.elementwise_giou(a, b), [-1.0 / 3.0, 1.0], rtol=1e-6)
    rng = np.random.default_rng(1)
    a, b = _random_boxes(rng, 50), _random_boxes(rng, 50)
    expected = [_python_giou(x, y) for x, y in zip(a.astype(np.float64), b.astype(np.float64))]
    np.testing.assert_allclose(box_lib.elementwise_giou(jnp.asarray(a), jnp.asarray(b)), expected, rtol=1e-5, atol=1e-6)


def test_degenerate_boxes_give_finite_iou_and_giou():
    point = jnp.array([[5.0, 5.0, 5.0, 5.0]])
    assert float(box_lib.pairwise_iou(point, point)[0, 0]) == 0.0
    assert float(box_lib.elementwise_giou(point, point)[0]) == 0.0
    assert np.isfinite(box_lib.encode_deltas(jnp.array([0.0, 0.0, 8.0, 8.0]), point[0])).all()


def test_clip_boxes():
    boxes = jnp.array([[-5.0, -1.0, 50.0, 30.0], [3.0, 4.0, 5.0, 6.0]])
    clipped = box_lib.clip_boxes(boxes, jnp.array([20, 40]))  # height 20, width 40
    np.testing.assert_allclose(clipped, [[0.0, 0.0, 40.0, 20.0], [3.0, 4.0, 5.0, 6.0]])


def test_delta_coder_hand_values_and_clamp():
    anchor = jnp.array([0.0, 0.0, 10.0, 10.0])
    box = jnp.array([5.0, 0.0, 15.0, 20.0])
    np.testing.assert_allclose(box_lib.encode_deltas(anchor, box), [5.0, 5.0, 0.0, 5.0 * math.log(2.0)], rtol=1e-6)
    huge = box_lib.decode_deltas(anchor, jnp.array([0.0, 0.0, 1e4, 1e4]))
    np.testing.assert_allclose(huge[2] - huge[0], 10.0 * 1000.0 / 16.0, rtol=1e-5)


box_arrays = hnp.arrays(np.float64, (16, 4), elements=st.floats(0.0, 1.0, allow_nan=False, allow_infinity=False))


@settings(max_examples=50, deadline=None)
@given(anchor_unit=box_arrays, box_unit=box_arrays)
def test_delta_coder_round_trip(anchor_unit, box_unit):
    def to_boxes(unit):  # sizes 16-500 px (ratios within the decode clamp), on a 1000 px canvas
        xy = unit[:, :2] * 1000.0
        return np.concatenate([xy, xy + 16.0 + unit[:, 2:] * 484.0], axis=-1).astype(np.float32)

    anchors, boxes = to_boxes(anchor_unit), to_boxes(box_unit)
    decoded = box_lib.decode_deltas(anchors, box_lib.encode_deltas(anchors, boxes))
    np.testing.assert_allclose(decoded, boxes, rtol=1e-4, atol=1e-2)


@settings(max_examples=50, deadline=None)
@given(
    points=hnp.arrays(np.float64, (16, 2), elements=st.floats(0.0, 1000.0)),
    distances=hnp.arrays(np.float64, (16, 4), elements=st.floats(0.0, 300.0)),
    stride=st.sampled_from([8.0, 16.0, 32.0, 64.0, 128.0]),
)
def test_ltrb_coder_round_trip(points, distances, stride):
    points = points.astype(np.float32)
    boxes = np.concatenate([points - distances[:, :2], points + distances[:, 2:]], axis=-1).astype(np.float32)
    encoded = box_lib.encode_ltrb(points, boxes, stride)
    np.testing.assert_allclose(encoded * stride, distances, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(box_lib.decode_ltrb(points, encoded, stride), boxes, rtol=1e-5, atol=1e-2)


def test_ltrb_hand_values_with_per_point_strides():
    points = jnp.array([[10.0, 10.0], [100.0, 50.0]])
    boxes = jnp.array([[2.0, 6.0, 26.0, 14.0], [36.0, 18.0, 228.0, 50.0]])
    encoded = box_lib.encode_ltrb(points, boxes, jnp.array([8.0, 64.0]))
    np.testing.assert_allclose(encoded, [[1.0, 0.5, 2.0, 0.5], [1.0, 0.5, 2.0, 0.0]])


@pytest.mark.parametrize("fn", [box_lib.xyxy_to_cxcywh, box_lib.box_area, box_lib.box_centers])
def test_functions_broadcast_over_leading_axes(fn):
    boxes = jnp.asarray(_random_boxes(np.random.default_rng(2), 24).reshape(2, 3, 4, 4))
    np.testing.assert_allclose(fn(boxes).reshape(24, -1), fn(boxes.reshape(24, 4)).reshape(24, -1))
