"""Norm layers and the convolution builder shared by the backbone, the FPN and the head.

The modules receive these as ``ModuleDef``s (layer constructors, as in the Flax ImageNet example)
instead of building their own, so the compute dtype, the norm and the convolution type are chosen
once, by the detector's builders, from the config.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atss_jax.models.deform_conv import ModulatedDeformConv

# A layer constructor: a Module class, a partial of one, or a function returning a Module.
ModuleDef = Any
# ``train -> norm ModuleDef``: trainable BatchNorm normalises with batch statistics only while training.
NormFactory = Callable[[bool], ModuleDef]
Initializer = Callable[..., jax.Array]

NORMS = ("frozen_bn", "bn", "gn")


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine (ImageNet-pretrained backbones), nothing trained:
    ``x [..., C] -> [..., C]`` in the dtype of ``x``.

    The four vectors live in the ``frozen`` collection, outside ``params``: the optimiser and weight
    decay never see them.
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.variable("frozen", "scale", jnp.ones, (features,), jnp.float32).value
        bias = self.variable("frozen", "bias", jnp.zeros, (features,), jnp.float32).value
        mean = self.variable("frozen", "mean", jnp.zeros, (features,), jnp.float32).value
        var = self.variable("frozen", "var", jnp.ones, (features,), jnp.float32).value
        # One multiply-add per element: the four vectors fold into a scale and a shift first.
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        return (x * multiplier.astype(x.dtype) + (bias - mean * multiplier).astype(x.dtype)).astype(x.dtype)


class GroupNorm(nn.Module):
    """GroupNorm with 32 groups: ``x [B, H, W, C] -> [B, H, W, C]``.

    Fewer groups (one channel each) when a narrow test model has fewer than 32 channels.
    """

    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.GroupNorm(num_groups=min(32, x.shape[-1]), epsilon=1e-5, dtype=self.dtype, name="norm")(x)


def make_norm(kind: str, dtype: jnp.dtype, axis_name: str | None = None) -> NormFactory:
    """The norm factory of ``kind``: "frozen_bn" (pretrained statistics and affine), "bn" (trainable,
    batch statistics synced over ``axis_name`` while training) or "gn" (GroupNorm(32), from scratch).

    Only "bn" depends on ``train``; the factory form lets a module take any of them the same way.
    """
    if kind == "frozen_bn":
        return lambda train: FrozenBatchNorm
    if kind == "bn":
        return lambda train: functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, axis_name=axis_name
        )
    if kind == "gn":
        return lambda train: functools.partial(GroupNorm, dtype=dtype)
    raise ValueError(f"backbone norm {kind!r} is not one of {NORMS}")


def conv(
    features: int,
    kernel_size: int,
    stride: int = 1,
    *,
    kernel_init: Initializer,
    dtype: jnp.dtype,
    groups: int = 1,
    use_bias: bool = True,
    bias_init: Initializer = nn.initializers.zeros,
    deformable: bool = False,
    name: str | None = None,
) -> nn.Module:
    """A square convolution ``[B, H, W, C_in] -> [B, ceil(H / stride), ceil(W / stride), features]``.

    Padding is torchvision's, ``kernel_size // 2`` on each side (not XLA's "SAME", which pads
    stride-2 layers on the bottom-right only): converted torchvision weights then see the same
    pixels, and every stride-2 layer maps ``n`` to ``ceil(n / 2)``, as ``anchors.feature_size``
    assumes.

    Args:
      features: output channels.
      kernel_size, stride: square kernel and stride.
      kernel_init, bias_init: parameter initialisers (the caller's architecture decides them).
      dtype: computation dtype (parameters stay float32).
      groups: grouped convolution (ResNeXt); ``C_in`` and ``features`` divisible by it.
      use_bias: False before a norm, whose shift makes a bias redundant.
      deformable: a modulated deformable convolution (DCNv2, ``deform_conv.ModulatedDeformConv``)
        with the same ``kernel``/``bias`` parameters, plus its zero-initialised ``conv_offset``.
      name: the layer's name in the parameter tree.
    """
    shared = dict(feature_group_count=groups, use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init,
                  dtype=dtype, name=name)
    if deformable:
        return ModulatedDeformConv(features, kernel_size, stride, **shared)
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), (stride, stride), padding=((pad, pad), (pad, pad)), **shared)
