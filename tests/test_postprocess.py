"""Fixed-shape NMS and detection selection against straightforward numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atss_jax import postprocess


def _numpy_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _numpy_nms(boxes, scores, classes, valid, iou_threshold, max_detections):
    """Greedy per-class NMS, one candidate at a time, best score first (ties: lower index)."""
    order = sorted((i for i in range(len(boxes)) if valid[i]), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if len(kept) == max_detections:
            break
        if all(classes[j] != classes[i] or _numpy_iou(boxes[i], boxes[j]) <= iou_threshold for j in kept):
            kept.append(i)
    return kept


def _random_candidates(rng, num, num_classes):
    centers = rng.uniform(0, 200, (6, 2))[rng.integers(0, 6, num)] + rng.normal(0, 10, (num, 2))
    sizes = rng.uniform(10, 60, (num, 2))
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], -1).astype(np.float32)
    scores = rng.permutation(num).astype(np.float32) / num  # distinct
    return boxes, scores, rng.integers(0, num_classes, num).astype(np.int32), rng.random(num) < 0.9


@pytest.mark.parametrize("max_detections", [5, 30, 400])
@pytest.mark.parametrize("iou_threshold", [0.3, 0.6])
def test_nms_matches_numpy_greedy(max_detections, iou_threshold):
    rng = np.random.default_rng(max_detections)
    batch = [_random_candidates(rng, 300, 4) for _ in range(4)]
    stacked = [np.stack(x) for x in zip(*batch)]
    keep, keep_valid = jax.jit(
        jax.vmap(
            lambda b, s, c, v: postprocess.batched_nms(
                b, s, c, v, iou_threshold=iou_threshold, max_detections=max_detections
            )
        )
    )(*stacked)
    for i, (boxes, scores, classes, valid) in enumerate(batch):
        expected = _numpy_nms(boxes.astype(np.float64), scores, classes, valid, iou_threshold, max_detections)
        count = int(keep_valid[i].sum())
        assert np.asarray(keep[i, :count]).tolist() == expected
        assert not np.asarray(keep_valid[i, count:]).any()
    assert keep.shape == (4, max_detections)


def test_nms_keeps_other_classes_and_ignores_invalid():
    boxes = jnp.array([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0]])
    scores = jnp.array([0.9, 0.8, 0.95, 0.7])
    classes = jnp.array([0, 1, 0, 0])
    valid = jnp.array([True, True, False, True])
    keep, keep_valid = postprocess.batched_nms(boxes, scores, classes, valid, iou_threshold=0.6, max_detections=4)
    # Box 2 is invalid despite the best score; box 3 (IoU 0.81 with box 0, same class) is suppressed.
    assert np.asarray(keep)[np.asarray(keep_valid)].tolist() == [0, 1]


def test_level_topk_per_level():
    rng = np.random.default_rng(0)
    scores = rng.random((30, 3)).astype(np.float32)
    anchor, cls = postprocess.level_topk(jnp.asarray(scores), (20, 8, 2), 5)
    expected = []
    for start, size in ((0, 20), (20, 8), (28, 2)):
        flat = scores[start : start + size].reshape(-1)
        for f in np.argsort(-flat, kind="stable")[: min(5, flat.size)]:
            expected.append((start + f // 3, f % 3))
    assert list(zip(np.asarray(anchor).tolist(), np.asarray(cls).tolist())) == expected


def test_select_detections_hand_case():
    # Three anchors in one level; anchors 0 and 1 predict overlapping boxes of class 1, anchor 2 is
    # outside the image. Canvas pixels are twice the original (scale 2).
    probs = jnp.array([[0.01, 0.9], [0.02, 0.8], [0.0, 0.99]])
    centerness = jnp.array([0.5, 0.9, 1.0])
    boxes = jnp.array([[10.0, 10.0, 50.0, 50.0], [12.0, 10.0, 52.0, 50.0], [0.0, 0.0, 5.0, 5.0]])
    detections = postprocess.select_detections(
        probs,
        centerness,
        boxes,
        jnp.array([True, True, False]),
        jnp.array([40, 100]),
        jnp.float32(2.0),
        level_sizes=(3,),
        score_threshold=0.05,
        pre_nms_topk=1000,
        iou_threshold=0.6,
        max_detections=3,
    )
    valid = np.asarray(detections.valid)
    assert valid.tolist() == [True, False, False]
    # Anchor 1 ranks first (0.8 * 0.9 > 0.9 * 0.5) and suppresses anchor 0 (IoU 0.905).
    np.testing.assert_allclose(detections.scores[0], np.sqrt(0.8 * 0.9), rtol=1e-6)
    # Clipped to the resized image (height 40), then mapped back to original pixels.
    np.testing.assert_allclose(detections.boxes[0], [6.0, 5.0, 26.0, 20.0])
    assert int(detections.classes[0]) == 1
