"""TOOD's task-aligned assigner against mmdetection 3.3.0's TaskAlignedAssigner and TOOD head normalisation, its
ATSS warmup switched inside one compiled function, and the train step assigning on its own predictions."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from atss_jax import boxes as box_lib
from atss_jax import train_step
from atss_jax.anchors import anchor_valid_mask, build_anchor_grid
from atss_jax.assigners import Predictions, build_assigner
from atss_jax.assigners.tal import tal_assign
from configs import base, demo
from scripts import mmdet_peer
from scripts.benchmark_common import synthetic_batch
from tests.prediction_cases import NUM_CLASSES, full_gt_index, mmdet_inputs, random_case


def _mmdet_tal(anchors, anchor_valid, gt_boxes, gt_valid, gt_labels, scores, pred_boxes, topk):
    """mmdetection's assignment mapped back to all anchors, and TOODHead._get_targets_single's normalised
    alignment."""
    mmdet_peer.import_mmdet()
    from mmdet.models.task_modules.assigners import TaskAlignedAssigner

    pred, gts, inside = mmdet_inputs(anchors, anchor_valid, gt_boxes, gt_valid, gt_labels, scores, pred_boxes)
    result = TaskAlignedAssigner(topk=topk).assign(pred, gts, alpha=1, beta=6)
    gt_index = full_gt_index(result.gt_inds.numpy(), inside, len(anchors))
    metrics, ious = np.zeros(len(anchors)), np.zeros(len(anchors))
    metrics[inside], ious[inside] = result.assign_metrics.numpy(), result.max_overlaps.numpy()
    quality = np.zeros(len(anchors), np.float32)
    for box in np.unique(gt_index[gt_index >= 0]):
        mine = gt_index == box
        quality[mine] = metrics[mine] / (metrics[mine].max() + 10e-8) * ious[mine].max()
    return gt_index, quality


@pytest.mark.parametrize("seed", range(4))
def test_tal_matches_mmdetection(seed):
    anchors, _, *case = random_case(np.random.default_rng(seed))
    result, quality = jax.jit(functools.partial(tal_assign, topk=13, alpha=1.0, beta=6.0, center_eps=0.01))(
        anchors, *case)
    expected_index, expected_quality = _mmdet_tal(anchors, *case, topk=13)
    np.testing.assert_array_equal(np.asarray(result.gt_index), expected_index)
    np.testing.assert_allclose(np.asarray(quality), expected_quality, rtol=1e-4, atol=1e-6)
    counts = np.bincount(expected_index[expected_index >= 0], minlength=len(case[1]))
    np.testing.assert_array_equal(np.asarray(result.num_positives), counts)
    assert counts[:-1].sum() > 0  # the cases do exercise positives


@pytest.mark.e2e
def test_tal_switches_from_atss_at_the_warmup_step_without_recompiling():
    config = base.get_config()
    config.assigner.name = "tal"
    config.assigner.warmup_assigner_steps = 3
    config.anchors.strides = (8, 16)
    grid = build_anchor_grid(config.anchors, (96, 96))
    rng = np.random.default_rng(7)
    boxes = np.asarray(grid.boxes)
    pred_boxes = (boxes + rng.normal(0.0, 4.0, boxes.shape)).astype(np.float32)[None]
    scores = rng.uniform(size=(1, len(boxes), NUM_CLASSES)).astype(np.float32)
    gt_boxes = np.array([[[10.0, 12.0, 50.0, 60.0], [40.0, 30.0, 90.0, 80.0]]], np.float32)
    gt_valid, gt_labels = np.ones((1, 2), bool), np.array([[0, 2]], np.int32)
    anchor_valid = np.ones((1, len(boxes)), bool)
    assign = jax.jit(build_assigner(config.assigner, grid))
    predictions = Predictions(scores, pred_boxes)
    atss = build_assigner(base.get_config().assigner, grid)(anchor_valid, gt_boxes, gt_valid)
    tal, tal_quality = tal_assign(boxes, anchor_valid[0], gt_boxes[0], gt_valid[0], gt_labels[0], scores[0],
                                  pred_boxes[0], topk=13, alpha=1.0, beta=6.0, center_eps=0.01)
    for step, expected in ((0, atss.gt_index[0]), (2, atss.gt_index[0]), (3, tal.gt_index), (10, tal.gt_index)):
        soft = assign(anchor_valid, gt_boxes, gt_valid, gt_labels, predictions, jnp.int32(step))
        np.testing.assert_array_equal(np.asarray(soft.result.gt_index[0]), np.asarray(expected))
    np.testing.assert_allclose(np.asarray(soft.quality[0]), np.asarray(tal_quality), rtol=1e-5)
    # During the warmup the soft target is the predicted box's IoU with its box (GFL's quality).
    soft = assign(anchor_valid, gt_boxes, gt_valid, gt_labels, predictions, jnp.int32(0))
    positive = np.asarray(atss.gt_index[0]) >= 0
    ious = [_iou(pred_boxes[0, a], gt_boxes[0, atss.gt_index[0, a]]) for a in np.flatnonzero(positive)]
    np.testing.assert_allclose(np.asarray(soft.quality[0])[positive], ious, rtol=1e-5)
    assert assign._cache_size() == 1


def _iou(a, b):
    inter = max(min(a[2], b[2]) - max(a[0], b[0]), 0) * max(min(a[3], b[3]) - max(a[1], b[1]), 0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class _AnchorWiseModel(nn.Module):
    """A stand-in detector with one free logit row, regression and centre-ness per anchor (cheap to compile): the
    train step's wiring is under test, not the network."""

    num_anchors: int
    num_classes: int

    @nn.compact
    def __call__(self, image, image_size, train=False):
        del image_size, train
        batch = image.shape[0]
        logits = self.param("logits", nn.initializers.normal(1.0), (self.num_anchors, self.num_classes))
        regression = self.param("regression", nn.initializers.normal(0.3), (self.num_anchors, 4))
        centerness = self.param("centerness", nn.initializers.zeros, (self.num_anchors,))
        return tuple(jnp.broadcast_to(x, (batch, *x.shape)) for x in (logits, regression, centerness))


@pytest.mark.e2e
def test_train_step_assigns_on_its_own_predictions_after_the_warmup():
    """Step 0 assigns with ATSS (its positives as ATSS's on the batch); step 1 with TAL on the predictions of the
    parameters it starts from, the classification learning the soft targets through QFL."""
    config = demo.get_config("tiny")
    config.assigner.name = "tal"
    config.assigner.warmup_assigner_steps = 1
    config.loss.classification = "quality_focal"
    config.model.head.use_centerness = False
    host = synthetic_batch(config, config.train.global_batch, np.random.default_rng(0))
    grid = build_anchor_grid(config.anchors, tuple(config.data.canvas))
    model = _AnchorWiseModel(grid.num_anchors, config.model.num_classes)
    params = model.init(jax.random.key(0), host["image"][:1], host["image_size"][:1])["params"]
    optimizer = optax.sgd(0.1)
    state = train_step.TrainState(step=jnp.int32(0), params=params, model_state={}, opt_state=optimizer.init(params),
                                  nonfinite_step=jnp.int32(-1))
    mesh = train_step.parallel.make_mesh()
    step_fn = train_step.compile_train_step(config, model, optimizer, mesh)
    batch = train_step.parallel.to_global(host, mesh)
    anchor_valid = anchor_valid_mask(grid.centers, host["image_size"])
    atss = build_assigner(base.get_config().assigner, grid)(anchor_valid, host["boxes"], host["box_valid"])
    state, first = step_fn(state, batch)
    start = jax.device_get(state.params)
    state, second = step_fn(state, batch)

    logits, regression, _ = model.apply({"params": start}, host["image"], host["image_size"])
    predictions = Predictions(jax.nn.sigmoid(logits), box_lib.decode_deltas(grid.boxes, regression))
    tal = build_assigner(config.assigner, grid)(anchor_valid, host["boxes"], host["box_valid"], host["labels"],
                                                predictions, 1).result
    valid = host["box_valid"]
    np.testing.assert_allclose(first["assign/positives_per_box"], np.mean(np.asarray(atss.num_positives)[valid]),
                               rtol=1e-6)
    np.testing.assert_allclose(second["assign/positives_per_box"], np.mean(np.asarray(tal.num_positives)[valid]),
                               rtol=1e-6)
    assert np.mean(np.asarray(tal.num_positives)[valid]) != np.mean(np.asarray(atss.num_positives)[valid])
    assert all(np.isfinite(m["loss"]) and m["loss_centerness"] == 0.0 for m in (first, second))
    assert int(state.nonfinite_step) == -1
