"""ATSS losses against hand-computed cases, with no positives, and across a named device axis."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atss_jax import losses
from configs import base

ANCHORS = jnp.array([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0]])  # centres (4, 4) and (12, 4)
STRIDES = jnp.array([8.0, 8.0])
GT_BOXES = jnp.array([[[0.0, 0.0, 10.0, 10.0]]])
GT_LABELS = jnp.array([[1]])
LOGITS = jnp.array([[[0.5, -1.0], [2.0, 0.0]]])


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _focal(x, target, alpha=0.25, gamma=2.0):
    p = _sigmoid(x)
    ce = -(target * math.log(p) + (1 - target) * math.log(1 - p))
    p_t = p if target else 1 - p
    return (alpha if target else 1 - alpha) * (1 - p_t) ** gamma * ce


def _bce(x, target):
    p = _sigmoid(x)
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


def _loss_config(**overrides):
    """configs/base.py's loss section (the paper's settings) with some fields changed."""
    config = base.get_config().loss
    config.update(overrides)
    return config


def _losses(gt_index, box_regression, anchor_valid=(True, True), regression="box", use_centerness=True, **overrides):
    return losses.detection_losses(
        LOGITS,
        jnp.asarray(box_regression, jnp.float32)[None],
        jnp.array([[0.3, -0.2]]),
        anchors=ANCHORS,
        anchor_strides=STRIDES,
        anchor_valid=jnp.array([anchor_valid]),
        gt_index=jnp.array([gt_index]),
        gt_boxes=GT_BOXES,
        gt_labels=GT_LABELS,
        config=_loss_config(**overrides),
        regression=regression,
        use_centerness=use_centerness,
    )


def test_hand_computed_point_regression_with_giou():
    # Anchor 0 is positive for the box; its LTRB (in strides) decodes to [2, 0, 10, 10].
    terms = _losses([0, -1], [[0.25, 0.5, 0.75, 0.75], [1.0, 1.0, 1.0, 1.0]], regression="point")
    classification = _focal(0.5, 0) + _focal(-1.0, 1) + _focal(2.0, 0) + _focal(0.0, 0)
    assert float(terms.classification) == pytest.approx(classification, rel=1e-5)
    # GIoU([2, 0, 10, 10], [0, 0, 10, 10]) = 0.8, weighted by centre-ness 2/3 and divided by it.
    assert float(terms.box) == pytest.approx(2.0 * (1 - 0.8), rel=1e-5)
    assert float(terms.centerness) == pytest.approx(_bce(0.3, 2 / 3), rel=1e-5)
    assert float(terms.total) == pytest.approx(classification + 0.4 + _bce(0.3, 2 / 3), rel=1e-5)
    assert float(terms.num_positives) == 1.0


def test_hand_computed_smooth_l1_on_deltas_without_centerness():
    # Anchor 0 (centre 4, side 8) to the box (centre 5, side 10): (1.25, 1.25, 5 ln 1.25, 5 ln 1.25).
    target = [1.25, 1.25, 5 * math.log(1.25), 5 * math.log(1.25)]
    prediction = [1.0, 1.3, 1.0, 1.1]
    terms = _losses([0, -1], [prediction, [0.0] * 4], box_loss="smooth_l1", box_loss_weight=1.0, use_centerness=False)
    beta = 1 / 9
    expected = sum(
        abs(p - t) - beta / 2 if abs(p - t) >= beta else 0.5 * (p - t) ** 2 / beta for p, t in zip(prediction, target)
    )
    assert float(terms.box) == pytest.approx(expected, rel=1e-5)
    assert float(terms.centerness) == 0.0


def test_ignored_and_invalid_anchors_contribute_nothing():
    full = _losses([0, -1], [[0.25, 0.5, 0.75, 0.75], [1.0] * 4], regression="point")
    ignored = _losses([0, -2], [[0.25, 0.5, 0.75, 0.75], [1.0] * 4], regression="point")
    invalid = _losses([0, -1], [[0.25, 0.5, 0.75, 0.75], [1.0] * 4], anchor_valid=(True, False), regression="point")
    without_anchor_1 = _focal(0.5, 0) + _focal(-1.0, 1)
    assert float(ignored.classification) == pytest.approx(without_anchor_1, rel=1e-5)
    assert float(invalid.classification) == pytest.approx(without_anchor_1, rel=1e-5)
    assert float(full.classification) > float(ignored.classification)


@pytest.mark.parametrize("regression", ["box", "point"])
def test_no_positives_gives_finite_losses_and_gradients(regression):
    def total(logits, regression_out, centerness):
        return losses.detection_losses(
            logits,
            regression_out,
            centerness,
            anchors=ANCHORS,
            anchor_strides=STRIDES,
            anchor_valid=jnp.ones((1, 2), bool),
            gt_index=jnp.array([[-1, -1]]),
            gt_boxes=GT_BOXES,
            gt_labels=GT_LABELS,
            config=_loss_config(),
            regression=regression,
            use_centerness=True,
        ).total

    args = (LOGITS, jnp.full((1, 2, 4), 50.0), jnp.zeros((1, 2)))
    value, grads = jax.value_and_grad(total, argnums=(0, 1, 2))(*args)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    expected = sum(_focal(x, 0) for x in (0.5, -1.0, 2.0, 0.0))
    assert float(value) == pytest.approx(expected, rel=1e-5)


def test_named_axis_normalisers_match_one_device():
    rng = np.random.default_rng(0)
    batch, num_anchors, num_classes, num_boxes = 4, 6, 3, 2
    anchors = jnp.asarray(
        np.tile([[0.0, 0.0, 16.0, 16.0]], (num_anchors, 1)) + np.arange(num_anchors)[:, None] * 4.0, jnp.float32
    )
    inputs = dict(
        class_logits=jnp.asarray(rng.normal(size=(batch, num_anchors, num_classes)), jnp.float32),
        box_regression=jnp.asarray(rng.uniform(0.5, 2.0, (batch, num_anchors, 4)), jnp.float32),
        centerness_logits=jnp.asarray(rng.normal(size=(batch, num_anchors)), jnp.float32),
        anchor_valid=jnp.asarray(rng.random((batch, num_anchors)) < 0.9),
        gt_index=jnp.asarray(
            [[0, 1, -1, -2, 0, -1], [-1] * 6, [1, 1, 0, -1, -1, -2], [0, -1, -1, -1, -1, -1]], jnp.int32
        ),
        gt_boxes=jnp.asarray(np.tile([[2.0, 2.0, 30.0, 20.0], [8.0, 0.0, 40.0, 16.0]], (batch, 1, 1)), jnp.float32),
        gt_labels=jnp.asarray(rng.integers(0, num_classes, (batch, num_boxes)), jnp.int32),
    )
    static = dict(anchors=anchors, anchor_strides=jnp.full((num_anchors,), 8.0), config=_loss_config(),
                  regression="point", use_centerness=True)
    whole = losses.detection_losses(**inputs, **static)
    per_device = jax.vmap(functools.partial(losses.detection_losses, **static, axis_name="data"), axis_name="data")(
        **{k: v.reshape(2, batch // 2, *v.shape[1:]) for k, v in inputs.items()}
    )
    for field in ("classification", "box", "centerness", "total"):
        assert float(jnp.mean(getattr(per_device, field))) == pytest.approx(float(getattr(whole, field)), rel=1e-5)
    assert float(per_device.num_positives[0]) == pytest.approx(float(whole.num_positives) / 2)


def test_bad_switches_are_named():
    with pytest.raises(ValueError, match="regression"):
        _losses([0, -1], [[0.0] * 4] * 2, regression="corners")
    with pytest.raises(ValueError, match="smooth_l1"):
        _losses([0, -1], [[0.0] * 4] * 2, regression="point", box_loss="smooth_l1")
