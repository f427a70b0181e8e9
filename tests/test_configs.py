"""Every experiment config (and each ATSS config's official variant) builds its model (shapes only, at full
size), assigner and schedule."""

import importlib
import inspect
import os

import jax
import jax.numpy as jnp
import pytest

from atss_jax import optim
from atss_jax.anchors import anchors_per_location, build_anchor_grid
from atss_jax.assigners import build_assigner
from atss_jax.data import transforms
from atss_jax.models.detector import build_detector, full_image_sizes

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NAMES = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "__init__.py")


def _variants(name: str) -> tuple[str, ...]:
    """The ATSS configs built on `base.variant` take "official" too."""
    module = importlib.import_module(f"configs.{name}")
    takes_variant = name.startswith("atss_") and "variant" in inspect.signature(module.get_config).parameters
    return ("", "official") if takes_variant else ("",)


CONFIGS = [(name, variant) for name in NAMES for variant in _variants(name)]


# Class-logit shapes by architecture (model, anchors and canvas): configs differing only in data, schedule,
# optimiser or input normalisation share one trace, which keeps this test's CI time small.
_SHAPES: dict[str, tuple[int, ...]] = {}
_NORMALISATION = ("input_channels", "pixel_mean", "pixel_std")


def _class_logits_shape(config, canvas: tuple[int, int]) -> tuple[int, ...]:
    model_fields = {k: v for k, v in config.model.to_dict().items() if k not in _NORMALISATION}
    key = f"{model_fields} {config.anchors.to_json()} {canvas}"
    if key not in _SHAPES:
        model = build_detector(config.model, anchors_per_location(config.anchors))
        image = jnp.zeros((1, *canvas, 3), jnp.uint8)
        outputs, _ = jax.eval_shape(model.init_with_output, jax.random.key(0), image, full_image_sizes(1, canvas))
        _SHAPES[key] = outputs[0].shape
    return _SHAPES[key]


@pytest.mark.parametrize("name,variant", CONFIGS)
def test_config_builds(name, variant):
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config(variant) if variant else module.get_config()
    canvas = tuple(transforms.canvases(config.data)[0])
    grid = build_anchor_grid(config.anchors, canvas)
    assert _class_logits_shape(config, canvas) == (1, grid.num_anchors, config.model.num_classes)
    build_assigner(config.assigner, grid)
    optim.learning_rate_schedule(config.optimizer, global_batch=config.train.global_batch,
                                 num_steps=config.train.num_steps)


@pytest.mark.parametrize("name,variant", CONFIGS)
def test_recipe_field_names_the_recipe(name, variant):
    """`config.recipe` says which optimiser and input settings the config has (configs/base.py)."""
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config(variant) if variant else module.get_config()
    recipe = (config.optimizer.bias_lr_factor, config.optimizer.bias_weight_decay_factor,
              config.optimizer.warmup_method, config.model.input_channels)
    assert recipe == {"mmdetection": (1.0, 1.0, "linear", "rgb"), "official": (2.0, 0.0, "constant", "bgr")}[
        config.recipe]
    if len(_variants(name)) > 1:  # the ATSS configs' docstrings say which recipe their variants follow
        assert "recipe" in module.__doc__.lower()


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
