"""Every experiment config builds its model (shapes only, at full size), assigner and schedule."""

import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from atss_jax import optim
from atss_jax.anchors import anchors_per_location, build_anchor_grid
from atss_jax.assigners import build_assigner
from atss_jax.data import transforms
from atss_jax.models.detector import build_detector

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "__init__.py")


@pytest.mark.parametrize("name", NAMES)
def test_config_builds(name):
    config = importlib.import_module(f"configs.{name}").get_config()
    canvas = transforms.canvases(config.data)[0]
    grid = build_anchor_grid(config.anchors, canvas)
    model = build_detector(config.model, anchors_per_location(config.anchors))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *canvas, 3), jnp.uint8))
    outputs = jax.eval_shape(model.apply, shapes, jnp.zeros((1, *canvas, 3), jnp.uint8))
    assert outputs[0].shape == (1, grid.num_anchors, config.model.num_classes)
    build_assigner(config.assigner, grid)


def test_config_is_locked():
    config = importlib.import_module("configs.base").get_config()
    with pytest.raises(AttributeError, match="topkk"):
        config.assigner.topkk = 7


def test_learning_rate_schedule():
    config = importlib.import_module("configs.base").get_config()
    schedule = optim.learning_rate_schedule(config.optimizer, global_batch=16, num_steps=90_000)
    assert float(schedule(0)) == pytest.approx(0.01 / 3)
    assert float(schedule(250)) == pytest.approx(0.01 * (1 / 3 + 2 / 3 * 0.5))
    assert float(schedule(59_999)) == pytest.approx(0.01)
    assert float(schedule(60_000)) == pytest.approx(0.001)
    assert float(schedule(80_000)) == pytest.approx(0.0001)
    assert float(optim.learning_rate_schedule(config.optimizer, global_batch=64, num_steps=90_000)(1000)) == \
        pytest.approx(0.04)


def test_weight_decay_mask_exempts_norms_and_biases_when_asked():
    config = importlib.import_module("configs.demo").get_config("tiny")
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.ones(2)}, "norm": {"scale": jnp.ones(2)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for decay_all in (True, False):
        config.optimizer.decay_norm_and_bias = decay_all
        optimizer = optim.make_optimizer(config.optimizer, lambda step: 0.01, jax.tree.map(lambda p: False, params))
        updates, _ = optimizer.update(zeros, optimizer.init(params), params)
        assert float(jnp.abs(updates["conv"]["kernel"]).sum()) > 0
        assert (float(jnp.abs(updates["conv"]["bias"]).sum()) > 0) == decay_all
        assert (float(jnp.abs(updates["norm"]["scale"]).sum()) > 0) == decay_all
