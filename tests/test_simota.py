"""YOLOX's SimOTA against mmdetection 3.3.0's SimOTAAssigner on random cases."""

import functools

import jax
import numpy as np
import pytest

from atss_jax import boxes as box_lib
from atss_jax.assigners.simota import simota_assign
from scripts import mmdet_peer
from tests.prediction_cases import full_gt_index, mmdet_inputs, random_case


def _mmdet_simota(anchors, strides, anchor_valid, gt_boxes, gt_valid, gt_labels, scores, pred_boxes):
    mmdet_peer.import_mmdet()
    from mmdet.models.task_modules.assigners import SimOTAAssigner

    # YOLOX's priors: (x, y, stride_x, stride_y), the points being our anchor centres.
    centers = np.asarray(box_lib.box_centers(anchors))
    priors = np.concatenate([centers, strides[:, None], strides[:, None]], -1).astype(np.float32)
    pred, gts, inside = mmdet_inputs(anchors, anchor_valid, gt_boxes, gt_valid, gt_labels, scores, pred_boxes,
                                     priors=priors)
    result = SimOTAAssigner(center_radius=2.5, candidate_topk=10, iou_weight=3.0, cls_weight=1.0).assign(pred, gts)
    gt_index = full_gt_index(result.gt_inds.numpy(), inside, len(anchors))
    ious = np.zeros(len(anchors), np.float32)
    ious[inside] = np.where(result.gt_inds.numpy() > 0, result.max_overlaps.numpy(), 0.0)
    return gt_index, ious


@pytest.mark.parametrize("seed", range(4))
def test_simota_matches_mmdetection(seed):
    case = random_case(np.random.default_rng(seed))
    assign = jax.jit(functools.partial(simota_assign, center_radius=2.5, candidate_topk=10, iou_weight=3.0,
                                       cls_weight=1.0))
    result, quality = assign(*case)
    expected_index, expected_quality = _mmdet_simota(*case)
    np.testing.assert_array_equal(np.asarray(result.gt_index), expected_index)
    np.testing.assert_allclose(np.asarray(quality), expected_quality, rtol=1e-5, atol=1e-6)
    counts = np.bincount(expected_index[expected_index >= 0], minlength=len(case[3]))
    np.testing.assert_array_equal(np.asarray(result.num_positives), counts)
    assert counts[:-1].min() >= 1  # every real box has its dynamic k >= 1 anchors here
