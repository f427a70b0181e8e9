"""The optimiser: learning-rate schedule, SGD with momentum, weight-decay and frozen-parameter masks."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(config: ml_collections.ConfigDict, *, global_batch: int, num_steps: int) -> optax.Schedule:
    """Linear warmup, then steps of ``lr_decay`` at the ``lr_milestones`` fractions of training.

    Args:
      config: the ``optimizer`` section of the experiment config.
      global_batch: images per step over all devices; the base rate is for ``config.base_batch``
        images and scales linearly with it.
      num_steps: the length of training, which the milestones are fractions of.
    """
    peak = config.base_lr * global_batch / config.base_batch
    boundaries = {round(m * num_steps): config.lr_decay for m in config.lr_milestones}
    decay = optax.piecewise_constant_schedule(peak, boundaries)

    def schedule(step):
        progress = jnp.minimum(step / max(config.warmup_steps, 1), 1.0)
        return decay(step) * (config.warmup_factor + (1 - config.warmup_factor) * progress)

    return schedule


def _decay_mask(params: Any, decay_norm_and_bias: bool) -> Any:
    """True where weight decay applies: everything, or only kernels (ndim > 1) when norms and biases are exempt."""
    return jax.tree.map(lambda p: decay_norm_and_bias or p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   frozen: Any) -> optax.GradientTransformation:
    """SGD with momentum, masked weight decay and optional clipping; frozen parameters untouched.

    Args:
      config: the ``optimizer`` section of the experiment config.
      schedule: the learning rate per step (``learning_rate_schedule``).
      frozen: a params-shaped pytree of bools (``models.detector.frozen_parameter_mask``): these
        parameters get no update at all, not even weight decay.
    """
    transforms = [optax.clip_by_global_norm(config.clip_grad_norm)] if config.clip_grad_norm else []
    transforms += [
        optax.add_decayed_weights(config.weight_decay, mask=functools.partial(
            _decay_mask, decay_norm_and_bias=config.decay_norm_and_bias)),
        optax.sgd(schedule, momentum=config.momentum),
    ]
    labels = jax.tree.map(lambda f: "frozen" if f else "train", frozen)
    return optax.multi_transform({"train": optax.chain(*transforms), "frozen": optax.set_to_zero()}, labels)
