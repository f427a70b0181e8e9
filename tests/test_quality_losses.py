"""Quality Focal Loss and Varifocal Loss against mmdetection 3.3.0's own, elementwise and inside
detection_losses (IoU targets, with and without the centre-ness branch, the assigner's soft targets)."""

import jax.numpy as jnp
import numpy as np
import pytest

from atss_jax import losses
from configs import base
from scripts import mmdet_peer

NUM_CLASSES = 4


def _mmdet_losses():
    mmdet_peer.import_mmdet()
    from mmdet.models.losses import QualityFocalLoss, VarifocalLoss

    return (QualityFocalLoss(use_sigmoid=True, beta=2.0, reduction="none"),
            VarifocalLoss(use_sigmoid=True, alpha=0.75, gamma=2.0, iou_weighted=True, reduction="none"))


def _mmdet_classification(kind: str, logits: np.ndarray, labels: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Per-anchor loss ``[N]`` of mmdetection's loss; ``labels [N]`` in 0..C-1 or C (background)."""
    import torch

    qfl, vfl = _mmdet_losses()
    pred = torch.from_numpy(logits)
    if kind == "quality_focal":  # GFLHead's (labels, scores) form
        return qfl(pred, (torch.from_numpy(labels).long(), torch.from_numpy(quality))).numpy()
    target = np.zeros_like(logits)  # VFNetHead's one-hot target scaled by the IoU
    positive = labels < logits.shape[1]
    target[positive, labels[positive]] = quality[positive]
    return vfl(pred, torch.from_numpy(target)).sum(dim=1).numpy()


@pytest.mark.parametrize("kind", ["quality_focal", "varifocal"])
def test_elementwise_loss_matches_mmdetection(kind):
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, (64, NUM_CLASSES)).astype(np.float32)
    labels = np.where(rng.uniform(size=64) < 0.4, rng.integers(0, NUM_CLASSES, 64), NUM_CLASSES)
    quality = rng.uniform(size=64).astype(np.float32)
    quality[:3] = 0.0  # positives whose predicted box misses: QFL still pulls them down, VFL treats them as negatives
    labels[:3] = 1
    soft = np.zeros_like(logits)
    positive = labels < NUM_CLASSES
    soft[positive, labels[positive]] = quality[positive]
    if kind == "quality_focal":
        ours = losses.quality_focal_loss(jnp.asarray(logits), jnp.asarray(soft), beta=2.0)
    else:
        ours = losses.varifocal_loss(jnp.asarray(logits), jnp.asarray(soft), alpha=0.75, gamma=2.0)
    np.testing.assert_allclose(np.asarray(ours).sum(axis=1), _mmdet_classification(kind, logits, labels, quality),
                               rtol=1e-5, atol=1e-6)


def _detection_case(rng):
    anchors = np.array([[x, y, x + 16.0, y + 16.0] for y in (0.0, 8.0, 16.0) for x in (0.0, 8.0, 16.0, 24.0)],
                       np.float32)
    strides = np.full(len(anchors), 8.0, np.float32)
    gt_boxes = np.array([[[2.0, 1.0, 20.0, 18.0], [14.0, 10.0, 40.0, 32.0]]], np.float32)
    gt_labels = np.array([[2, 0]], np.int32)
    gt_index = rng.choice([-1, -1, 0, 1], len(anchors))[None].astype(np.int32)
    logits = rng.normal(0.0, 1.5, (1, len(anchors), NUM_CLASSES)).astype(np.float32)
    deltas = rng.normal(0.0, 0.5, (1, len(anchors), 4)).astype(np.float32)
    centerness = rng.normal(size=(1, len(anchors))).astype(np.float32)
    return anchors, strides, gt_boxes, gt_labels, gt_index, logits, deltas, centerness


def _np_iou(a, b):
    inter = np.prod(np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None), -1)
    area = np.prod(a[..., 2:] - a[..., :2], -1) + np.prod(b[..., 2:] - b[..., :2], -1)
    return inter / (area - inter)


def _np_decode(anchors, deltas):
    """mmdetection's DeltaXYWHBBoxCoder decode, stds (0.1, 0.1, 0.2, 0.2), written out in numpy."""
    wh = anchors[:, 2:] - anchors[:, :2]
    center = (anchors[:, :2] + anchors[:, 2:]) / 2 + deltas[:, :2] * 0.1 * wh
    size = wh * np.exp(deltas[:, 2:] * 0.2)
    return np.concatenate([center - size / 2, center + size / 2], -1)


@pytest.mark.parametrize("use_centerness", [True, False])
@pytest.mark.parametrize("kind", ["quality_focal", "varifocal"])
@pytest.mark.parametrize("soft_targets", [False, True])
def test_detection_losses_classification_term(kind, use_centerness, soft_targets):
    rng = np.random.default_rng(1)
    anchors, strides, gt_boxes, gt_labels, gt_index, logits, deltas, centerness = _detection_case(rng)
    config = base.get_config().loss
    config.classification = kind
    given = rng.uniform(size=gt_index.shape).astype(np.float32) if soft_targets else None
    terms = losses.detection_losses(
        jnp.asarray(logits), jnp.asarray(deltas), jnp.asarray(centerness), anchors=jnp.asarray(anchors),
        anchor_strides=jnp.asarray(strides), anchor_valid=jnp.ones(gt_index.shape, bool),
        gt_index=jnp.asarray(gt_index), gt_boxes=jnp.asarray(gt_boxes), gt_labels=jnp.asarray(gt_labels),
        config=config, regression="box", use_centerness=use_centerness,
        quality_targets=None if given is None else jnp.asarray(given))
    positive = gt_index[0] >= 0
    labels = np.where(positive, gt_labels[0][np.maximum(gt_index[0], 0)], NUM_CLASSES)
    matched = gt_boxes[0][np.maximum(gt_index[0], 0)]
    quality = given[0] if soft_targets else _np_iou(_np_decode(anchors, deltas[0]), matched).astype(np.float32)
    quality = np.where(positive, quality, 0.0).astype(np.float32)
    expected = _mmdet_classification(kind, logits[0], labels, quality).sum() / positive.sum()
    np.testing.assert_allclose(float(terms.classification), expected, rtol=1e-5)
    assert np.isfinite(float(terms.total))
    assert (float(terms.centerness) > 0.0) == use_centerness


def test_unknown_classification_loss_is_named():
    config = base.get_config().loss
    config.classification = "softmax"
    with pytest.raises(ValueError, match=r"config\.loss\.classification='softmax'"):
        losses.detection_losses(
            jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 2)), anchors=jnp.ones((2, 4)),
            anchor_strides=jnp.ones(2), anchor_valid=jnp.ones((1, 2), bool), gt_index=jnp.zeros((1, 2), jnp.int32),
            gt_boxes=jnp.ones((1, 1, 4)), gt_labels=jnp.zeros((1, 1), jnp.int32), config=config, regression="box",
            use_centerness=True)

