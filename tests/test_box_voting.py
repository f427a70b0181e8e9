"""Box voting and the size-range filter of test-time augmentation against loop references of the official code
(tests/reference_tta.py; remove_boxes here), and a hand-computed case."""

import jax
import numpy as np
import pytest

from atss_jax import postprocess, tta
from tests.reference_tta import official_merge


def _vote(boxes, scores, classes, valid, *, max_detections, soft=True, vote_threshold=0.66, soft_score_threshold=0.05):
    def one(b, s, c, v):
        voted = postprocess.box_vote(b, s, c, v, vote_threshold=vote_threshold, soft=soft,
                                     soft_score_threshold=soft_score_threshold)
        return postprocess.best_detections(voted, max_detections)

    return jax.device_get(jax.jit(jax.vmap(one))(boxes, scores, classes, valid))


def _rows(detections, image):
    valid = detections.valid[image]
    return np.concatenate([detections.boxes[image][valid], detections.scores[image][valid][:, None],
                           detections.classes[image][valid][:, None]], 1)


def test_vote_by_hand():
    boxes = np.array([[0, 0, 10, 10],     # a: 0.9, clusters with b
                      [0, 0, 10, 20],     # e: 0.8, IoU 0.5 with a: a cluster of its own
                      [0, 0, 10, 11],     # b: 0.6, IoU 10/11 with a
                      [20, 20, 30, 30],   # c: 0.5, alone
                      [0, 0, 10, 10]],    # d: 0.3, a's box in another class
                     np.float32)[None]
    scores = np.array([[0.9, 0.8, 0.6, 0.5, 0.3]], np.float32)
    classes = np.array([[0, 0, 0, 0, 1]], np.int32)
    valid = np.ones((1, 5), bool)
    voted_a = [0, 0, 10, (0.9 * 10 + 0.6 * 11) / 1.5, 0.9, 0]
    expected = [voted_a, [0, 0, 10, 20, 0.8, 0], [20, 20, 30, 30, 0.5, 0], [0, 0, 10, 10, 0.3, 1]]
    soft_b = [0, 0, 10, 11, 0.6 * (1 - 10 / 11), 0]  # 0.0545 >= 0.05
    np.testing.assert_allclose(_rows(_vote(boxes, scores, classes, valid, max_detections=8), 0),
                               [*expected, soft_b], rtol=1e-6)
    np.testing.assert_allclose(_rows(_vote(boxes, scores, classes, valid, max_detections=8, soft=False), 0),
                               expected, rtol=1e-6)
    np.testing.assert_allclose(
        _rows(_vote(boxes, scores, classes, valid, max_detections=8, soft_score_threshold=0.06), 0), expected,
        rtol=1e-6)
    np.testing.assert_allclose(_rows(_vote(boxes, scores, classes, valid, max_detections=3), 0), expected[:3],
                               rtol=1e-6)
    np.testing.assert_allclose(_rows(_vote(boxes, scores, classes, ~np.eye(5, dtype=bool)[:1], max_detections=8), 0),
                               [[0, 0, 10, 20, 0.8, 0], [0, 0, 10, 11, 0.6, 0], [20, 20, 30, 30, 0.5, 0],
                                [0, 0, 10, 10, 0.3, 1]], rtol=1e-6)  # without a, b is alone


def _clustered_candidates(rng, num, num_classes):
    """Views' detections of a few objects: jittered copies of each, so clusters form."""
    objects = np.concatenate([rng.uniform(0, 300, (8, 2)), rng.uniform(10, 120, (8, 2))], 1)
    picked = objects[rng.integers(0, 8, num)]
    centers = picked[:, :2] + rng.normal(0, 0.06, (num, 2)) * picked[:, 2:]
    sizes = picked[:, 2:] * rng.uniform(0.85, 1.15, (num, 2))
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], 1).astype(np.float32)
    scores = (0.05 + 0.95 * rng.permutation(num) / num).astype(np.float32)  # distinct
    return boxes, scores, rng.integers(0, num_classes, num).astype(np.int32), rng.random(num) < 0.9


@pytest.mark.parametrize("soft", [True, False])
def test_vote_matches_the_official_loop(soft):
    rng = np.random.default_rng(int(soft))
    batch = [_clustered_candidates(rng, 240, 3) for _ in range(3)]
    boxes, scores, classes, valid = (np.stack(x) for x in zip(*batch))
    max_detections = 150
    detections = _vote(boxes, scores, classes, valid, max_detections=max_detections, soft=soft)
    for image in range(3):
        expected = official_merge(boxes[image], scores[image], classes[image], valid[image], 0.66, soft, 0.05,
                                   max_detections)
        got = _rows(detections, image)
        if soft:
            assert len(expected) > len(np.unique(classes[image][valid[image]]))  # some soft rows
        assert (len(got) == max_detections) == (len(expected) >= max_detections)
        assert len(got) == min(len(expected), max_detections)
        np.testing.assert_allclose(got, expected[:len(got)], rtol=1e-5, atol=1e-3)


def test_size_range_filter_by_hand_and_against_the_official_loop():
    boxes = np.array([[[0, 0, 10, 10], [5, 5, 15, 15]]], np.float32)  # 100 px^2 each; 400 at scale 2
    scales = np.array([2.0])
    assert tta.in_size_range(boxes, scales, (19.9, 20.1)).tolist() == [[True, True]]
    assert tta.in_size_range(boxes, scales, (0, 20)).tolist() == [[False, False]]  # strict at both ends
    assert tta.in_size_range(boxes, scales, (20, 30)).tolist() == [[False, False]]

    rng = np.random.default_rng(3)
    corner = rng.uniform(0, 400, (4, 50, 2))
    boxes = np.concatenate([corner, corner + rng.uniform(1, 200, (4, 50, 2))], -1).astype(np.float32)
    scales = rng.uniform(0.5, 3.0, 4)
    for size_range in [(96, 10000), (0, 256), (64, 192)]:
        expected = np.zeros((4, 50), bool)
        for image in range(4):
            for j, box in enumerate(boxes[image].astype(np.float64) * scales[image] - [0, 0, 1, 1]):
                area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)  # official remove_boxes, view pixels
                expected[image, j] = size_range[0] ** 2 < area < size_range[1] ** 2
        assert 0 < expected.sum() < expected.size
        np.testing.assert_array_equal(tta.in_size_range(boxes, scales, size_range), expected)


def test_soft_vote_needs_a_positive_threshold():
    with pytest.raises(ValueError, match="positive"):
        postprocess.box_vote(np.zeros((2, 4), np.float32), np.zeros(2, np.float32), np.zeros(2, np.int32),
                             np.ones(2, bool), vote_threshold=0.66, soft=True, soft_score_threshold=0.0)
