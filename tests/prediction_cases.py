"""Random cases for the prediction-aware assigners: anchors, predictions and boxes of one image."""

import numpy as np

NUM_CLASSES = 3
STRIDES = (8, 16)


def random_case(rng: np.random.Generator, num_boxes: int = 5, canvas: int = 96, invalid_fraction: float = 0.1):
    """(anchors [A, 4], anchor_strides [A], anchor_valid [A], gt_boxes [G, 4], gt_valid [G], gt_labels [G],
    scores [A, C], pred_boxes [A, 4]): anchors four strides wide on two levels, predicted boxes jittered around
    them, random scores and boxes; the last box is padding."""
    anchors, strides = [], []
    for stride in STRIDES:
        centers = (np.arange(canvas // stride) + 0.5) * stride
        cx, cy = np.meshgrid(centers, centers)
        half = 2.0 * stride
        anchors.append(np.stack([cx - half, cy - half, cx + half, cy + half], -1).reshape(-1, 4))
        strides.append(np.full(cx.size, stride, np.float32))
    anchors, strides = np.concatenate(anchors).astype(np.float32), np.concatenate(strides)
    jitter = rng.normal(0.0, 6.0, anchors.shape)
    pred_boxes = np.sort((anchors + jitter).reshape(-1, 2, 2), axis=1).reshape(-1, 4).astype(np.float32)
    size = rng.uniform(10.0, 60.0, (num_boxes, 2))
    corner = rng.uniform(0.0, 1.0, (num_boxes, 2)) * (canvas - size)
    gt_boxes = np.concatenate([corner, corner + size], -1).astype(np.float32)
    gt_valid = np.arange(num_boxes) < num_boxes - 1
    gt_labels = rng.integers(0, NUM_CLASSES, num_boxes).astype(np.int32)
    scores = rng.uniform(0.0, 1.0, (len(anchors), NUM_CLASSES)).astype(np.float32)
    anchor_valid = rng.uniform(size=len(anchors)) >= invalid_fraction
    return anchors, strides, anchor_valid, gt_boxes, gt_valid, gt_labels, scores, pred_boxes


def mmdet_inputs(anchors, anchor_valid, gt_boxes, gt_valid, gt_labels, scores, pred_boxes, priors=None):
    """mmdetection's (pred_instances, gt_instances) on the valid anchors and boxes, as its heads feed them, and the
    valid anchors' indices; ``priors`` replaces the anchors as ``priors`` (SimOTA's points and strides)."""
    import torch
    from mmengine.structures import InstanceData

    inside = np.flatnonzero(anchor_valid)
    priors = anchors if priors is None else priors
    pred = InstanceData(priors=torch.from_numpy(priors[inside]), scores=torch.from_numpy(scores[inside]),
                        bboxes=torch.from_numpy(pred_boxes[inside]))
    gts = InstanceData(bboxes=torch.from_numpy(gt_boxes[gt_valid]),
                       labels=torch.from_numpy(gt_labels[gt_valid]).long())
    return pred, gts, inside


def full_gt_index(assigned_gt_inds, inside, num_anchors: int) -> np.ndarray:
    """mmdetection's 1-based ``gt_inds`` on the valid anchors -> our ``gt_index [A]`` (valid boxes come first, so
    their indices are ours)."""
    gt_index = np.full(num_anchors, -1)
    gt_index[inside] = np.asarray(assigned_gt_inds) - 1
    return gt_index
