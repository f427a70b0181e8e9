"""The optimiser: learning-rate schedule, SGD with momentum, weight-decay and frozen-parameter masks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from atss_jax import errors

WARMUP_METHODS = ("linear", "constant")


def learning_rate_schedule(config: ml_collections.ConfigDict, *, global_batch: int, num_steps: int) -> optax.Schedule:
    """Warmup, then steps of ``lr_decay`` at the ``lr_milestones`` fractions of training.

    The warmup multiplies the rate of steps ``0 .. warmup_steps - 1`` (the official
    ``WarmupMultiStepLR``, whose ``last_epoch`` is this 0-based step): "linear" rises from
    ``warmup_factor`` towards 1, "constant" holds ``warmup_factor``. A milestone's step already has
    the decayed rate.

    Args:
      config: the ``optimizer`` section of the experiment config.
      global_batch: images per step over all devices; the base rate is for ``config.base_batch``
        images and scales linearly with it.
      num_steps: the length of training, which the milestones are fractions of.

    Returns:
      step [] int -> learning rate [] float32.
    """
    if config.warmup_method not in WARMUP_METHODS:
        raise errors.ConfigError(
            f"config.optimizer.warmup_method={config.warmup_method!r}: use one of {WARMUP_METHODS}")
    peak = config.base_lr * global_batch / config.base_batch
    boundaries = {round(m * num_steps): config.lr_decay for m in config.lr_milestones}
    decay = optax.piecewise_constant_schedule(peak, boundaries)

    def schedule(step):
        if config.warmup_method == "constant":
            factor = jnp.where(step < config.warmup_steps, config.warmup_factor, 1.0)
        else:
            progress = jnp.minimum(step / max(config.warmup_steps, 1), 1.0)
            factor = config.warmup_factor + (1 - config.warmup_factor) * progress
        return decay(step) * factor

    return schedule


def bias_mask(params: Any) -> Any:
    """``params``-shaped bools: True for the parameters named ``bias`` (convolution, GroupNorm and
    trainable BatchNorm biases, DCN offset-conv biases), the ones the official solver's ``"bias" in
    name`` rule singles out; norm scales and the head's per-level scales are not biases."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) == "bias", params)


def _decay_mask(params: Any, decay_norm_and_bias: bool, biases: bool) -> Any:
    """True where a weight decay applies, for the biases (``biases``) or for every other parameter:
    all of them, or only kernels (ndim > 1) when norms and biases are exempt."""
    return jax.tree.map(lambda p, is_bias: is_bias == biases and (decay_norm_and_bias or p.ndim > 1),
                        params, bias_mask(params))


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   frozen: Any) -> optax.GradientTransformation:
    """SGD with momentum, masked weight decay, the biases' own rate and decay, optional clipping;
    frozen parameters untouched.

    Per parameter as torch's SGD with one group per parameter (the official solver): the decay is
    added to the gradient before momentum, and a bias's momentum buffer is stepped by
    ``bias_lr_factor`` times the rate, with ``bias_weight_decay_factor`` times the weight decay.

    Args:
      config: the ``optimizer`` section of the experiment config.
      schedule: the learning rate per step (``learning_rate_schedule``).
      frozen: a params-shaped pytree of bools (``models.detector.frozen_parameter_mask``): these
        parameters get no update at all, not even weight decay.
    """
    def mask(biases: bool):
        return lambda params: _decay_mask(params, config.decay_norm_and_bias, biases)

    transforms = [optax.clip_by_global_norm(config.clip_grad_norm)] if config.clip_grad_norm else []
    transforms += [
        optax.add_decayed_weights(config.weight_decay, mask=mask(biases=False)),
        optax.add_decayed_weights(config.weight_decay * config.bias_weight_decay_factor, mask=mask(biases=True)),
        optax.sgd(schedule, momentum=config.momentum),
        optax.masked(optax.scale(config.bias_lr_factor), bias_mask),
    ]
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    return optax.multi_transform({"train": optax.chain(*transforms), "frozen": optax.set_to_zero()}, labels)
