"""OTA against a plain numpy reference: per-box loops for the costs and the dynamic k, a loop of log-domain
Sinkhorn steps in float64; and against the per-image design that scripts/benchmark_assign.py times it with."""

import functools

import jax
import numpy as np
import pytest
from scipy.special import logsumexp

from atss_jax.assigners.ota import ota_assign
from tests.prediction_cases import random_case
from tests.reference_prediction_assigners import ota_per_image

SETTINGS = dict(center_radius=2.5, candidate_topk=20, iou_weight=3.0, epsilon=0.1, iterations=50, focal_alpha=0.25,
                focal_gamma=2.0)


def _iou_giou(a, b):
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
    hull = np.prod(np.maximum(a[2:], b[2:]) - np.minimum(a[:2], b[:2]))
    return inter / union, inter / union - (hull - union) / hull


def _focal(p, target, alpha=0.25, gamma=2.0):
    """Summed over classes; ``p`` the probabilities."""
    ce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    p_t = np.where(target == 1, p, 1 - p)
    return np.sum(np.where(target == 1, alpha, 1 - alpha) * (1 - p_t) ** gamma * ce)


def _reference(anchors, strides, anchor_valid, gt_boxes, gt_valid, gt_labels, scores, pred_boxes):
    anchors, scores, pred_boxes = (np.asarray(x, np.float64) for x in (anchors, scores, pred_boxes))
    boxes = [g for g in range(len(gt_boxes)) if gt_valid[g]]
    valid = np.flatnonzero(anchor_valid)
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    cost = np.zeros((len(boxes) + 1, len(valid)))
    supply = np.zeros(len(boxes) + 1)
    for row, g in enumerate(boxes):
        box = gt_boxes[g].astype(np.float64)
        target = np.eye(scores.shape[1])[gt_labels[g]]
        candidate_ious = []
        for column, a in enumerate(valid):
            iou, giou = _iou_giou(pred_boxes[a], box)
            inside = (centers[a, 0] > box[0] and centers[a, 1] > box[1] and centers[a, 0] < box[2]
                      and centers[a, 1] < box[3])
            near = np.all(np.abs(centers[a] - (box[:2] + box[2:]) / 2) < SETTINGS["center_radius"] * strides[a])
            cost[row, column] = _focal(scores[a], target) + 3.0 * (1 - giou) + (0.0 if inside and near else 1e6)
            if inside and near:
                candidate_ious.append(iou)
        supply[row] = max(1.0, np.floor(np.sum(sorted(candidate_ious)[::-1][:20])))
    for column, a in enumerate(valid):
        cost[-1, column] = _focal(scores[a], np.zeros(scores.shape[1]))
    supply[-1] = len(valid) - supply[:-1].sum()
    demand = np.ones(len(valid))
    u, v, eps = np.zeros(len(supply)), np.zeros(len(valid)), SETTINGS["epsilon"]
    for _ in range(SETTINGS["iterations"]):
        v = eps * (np.log(demand + 1e-8) - logsumexp((-cost + u[:, None] + v[None]) / eps, axis=0)) + v
        u = eps * (np.log(supply + 1e-8) - logsumexp((-cost + u[:, None] + v[None]) / eps, axis=1)) + u
    plan = np.exp((-cost + u[:, None] + v[None]) / eps)
    plan /= plan.max(axis=1, keepdims=True)
    gt_index = np.full(len(anchors), -1)
    winner = plan.argmax(axis=0)
    for column, a in enumerate(valid):
        if winner[column] < len(boxes):
            gt_index[a] = boxes[winner[column]]
    return gt_index, plan


@pytest.mark.parametrize("seed", range(3))
def test_ota_matches_a_numpy_sinkhorn(seed):
    case = random_case(np.random.default_rng(seed))
    result, quality = jax.jit(functools.partial(ota_assign, **SETTINGS))(*case)
    expected, plan = _reference(*case)
    top_two = np.sort(plan, axis=0)[-2:]
    decided = top_two[1] - top_two[0] > 1e-3  # anchors the float32 plan cannot split otherwise
    valid = np.flatnonzero(case[2])
    np.testing.assert_array_equal(np.asarray(result.gt_index)[valid][decided], expected[valid][decided])
    assert decided.mean() > 0.95
    np.testing.assert_array_equal(np.asarray(result.gt_index)[~case[2]], -1)
    positive = expected >= 0
    assert positive.sum() > 0
    counts = np.bincount(np.asarray(result.gt_index)[np.asarray(result.gt_index) >= 0], minlength=len(case[3]))
    np.testing.assert_array_equal(np.asarray(result.num_positives), counts)
    assert np.all(np.asarray(quality)[~positive & (np.asarray(result.gt_index) < 0)] == 0.0)


@pytest.mark.parametrize("seed", range(4))
def test_the_per_image_design_of_the_benchmark_matches(seed):
    # scripts/benchmark_assign.py's reference: the official code's design, the [G + 1, A] cost matrix of one image and
    # float32 Sinkhorn steps on it.
    case = random_case(np.random.default_rng(seed), num_boxes=12)
    anchors, strides, anchor_valid, gt_boxes, gt_valid, gt_labels, scores, pred_boxes = case
    result, _ = jax.jit(functools.partial(ota_assign, **SETTINGS))(*case)
    # The image's real boxes only, as the per-image designs take them (the padding box is the last).
    expected = ota_per_image(anchors, strides, anchor_valid, gt_boxes[gt_valid], gt_labels[gt_valid], scores,
                             pred_boxes, **SETTINGS)
    np.testing.assert_array_equal(np.asarray(result.gt_index), expected)
    assert (expected >= 0).sum() > 0
