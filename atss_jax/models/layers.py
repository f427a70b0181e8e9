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

from atss_jax import xla_flags
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


# How a convolution's weight gradient is computed: "xla" (XLA's own), "im2col" (one matmul per kernel tap of the
# shifted input with the output gradient, ``im2col_weight_grad_conv``) or "auto" (im2col on the CPU backend where it
# is faster than XLA's, see ``im2col_weight_grad_conv``).
CONV_WEIGHT_GRADS = ("auto", "xla", "im2col")


def _tap_slices(lhs: jax.Array, kernel_hw: tuple[int, int], out_hw: tuple[int, int], strides: tuple[int, int],
                padding: tuple[tuple[int, int], ...], dilation: tuple[int, int]) -> list[jax.Array]:
    """``lhs [B, H, W, C]`` -> per kernel tap ``(i, j)`` (row-major), ``[B, H_out, W_out, C]``: the input
    pixels that tap multiplies."""
    padded = jnp.pad(lhs, ((0, 0), *padding, (0, 0)))
    (kh, kw), (ho, wo), (sh, sw), (dh, dw) = kernel_hw, out_hw, strides, dilation
    return [jax.lax.slice(padded, (0, i * dh, j * dw, 0),
                          (lhs.shape[0], i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, lhs.shape[3]),
                          (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def _im2col_kernel_grad(lhs: jax.Array, out_grad: jax.Array, kernel_shape: tuple[int, ...],
                        strides: tuple[int, int], padding: tuple[tuple[int, int], ...], dilation: tuple[int, int],
                        groups: int) -> jax.Array:
    """The gradient of an NHWC/HWIO convolution's kernel: ``lhs [B, H, W, C_in]``, ``out_grad [B, H', W',
    C_out]`` -> ``[kh, kw, C_in / groups, C_out]`` in the kernel's dtype, accumulated in float32."""
    kh, kw, group_in, features = kernel_shape
    rows = out_grad.shape[0] * out_grad.shape[1] * out_grad.shape[2]
    taps = _tap_slices(lhs, (kh, kw), out_grad.shape[1:3], strides, padding, dilation)
    if groups == 1:
        # XLA:CPU copies a matmul operand transposed when the matmul contracts its rows, and left to itself it may
        # pick the larger one; transpose the smaller side: the output gradient once, or the kernel's taps (1x1
        # bottleneck layers differ 4x in channels).
        grad = out_grad.reshape(rows, features)
        if features < kh * kw * group_in:
            grad_t = grad.T
            per_tap = [jnp.dot(grad_t, tap.reshape(rows, group_in), preferred_element_type=jnp.float32)
                       for tap in taps]
            return jnp.stack(per_tap).reshape(kh, kw, features, group_in).transpose(0, 1, 3, 2)
        per_tap = [jnp.dot(tap.reshape(rows, group_in).T, grad, preferred_element_type=jnp.float32) for tap in taps]
        return jnp.stack(per_tap).reshape(kernel_shape)
    grad = out_grad.reshape(rows, groups, features // groups)
    per_group_taps = []
    for tap in taps:
        # [C_in / groups, groups, C_out / groups]: each group's inputs with its own outputs only.
        per_group = jnp.einsum("ngc,ngo->cgo", tap.reshape(rows, groups, group_in), grad,
                               preferred_element_type=jnp.float32)
        per_group_taps.append(per_group.reshape(group_in, features))
    return jnp.stack(per_group_taps).reshape(kernel_shape)


def _conv_nhwc(lhs: jax.Array, rhs: jax.Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...],
               dilation: tuple[int, int], groups: int) -> jax.Array:
    return jax.lax.conv_general_dilated(lhs, rhs, strides, padding, rhs_dilation=dilation,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


_conv_im2col = jax.custom_vjp(_conv_nhwc, nondiff_argnums=(2, 3, 4, 5))


def _conv_im2col_forward(lhs, rhs, strides, padding, dilation, groups):
    return _conv_im2col(lhs, rhs, strides, padding, dilation, groups), (lhs, rhs)


def _conv_im2col_backward(strides, padding, dilation, groups, residuals, out_grad):
    lhs, rhs = residuals
    # XLA's input gradient is as fast as its forward on the CPU; only its kernel gradient is slow.
    _, input_vjp = jax.vjp(lambda x: _conv_nhwc(x, rhs, strides, padding, dilation, groups), lhs)
    (lhs_grad,) = input_vjp(out_grad)
    kernel_grad = _im2col_kernel_grad(lhs, out_grad, rhs.shape, strides, padding, dilation, groups)
    return lhs_grad, kernel_grad.astype(rhs.dtype)


_conv_im2col.defvjp(_conv_im2col_forward, _conv_im2col_backward)


def im2col_weight_grad_conv(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                            rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                            precision=None, weight_grad: str = "auto") -> jax.Array:
    """``jax.lax.conv_general_dilated`` (the signature ``nn.Conv`` calls it with) whose kernel gradient is a
    matmul per kernel tap instead of XLA's weight-gradient convolution (the same values to float32 rounding).

    ``weight_grad`` (one of ``CONV_WEIGHT_GRADS``) is resolved when traced. "auto" is XLA's own off the CPU;
    on the CPU it is im2col for 1x1, strided and grouped kernels, which Eigen's weight-gradient convolution
    runs 1.4-3x slower than the matmuls, and for every kernel when YNNPACK runs the convolutions (its weight
    gradient is 3-8x slower; ``atss_jax.xla_flags``), XLA's own for the rest. Anything but NHWC/HWIO,
    explicit padding and no input dilation goes to XLA unchanged.
    """
    if weight_grad not in CONV_WEIGHT_GRADS:
        raise ValueError(f"conv weight_grad={weight_grad!r} is not one of {CONV_WEIGHT_GRADS}")
    if weight_grad == "auto":
        eigen_is_faster = (rhs.shape[0] * rhs.shape[1] > 1 and all(s == 1 for s in window_strides)
                           and feature_group_count == 1 and not xla_flags.cpu_convolutions_on_ynn())
        weight_grad = "im2col" if jax.default_backend() == "cpu" and not eigen_is_faster else "xla"
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    use_im2col = weight_grad == "im2col" and (
        lhs.ndim == 4 and not isinstance(padding, str) and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
        and precision is None and lhs.dtype == rhs.dtype)
    if not use_im2col:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count, precision=precision)
    return _conv_im2col(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding),
                        tuple(rhs_dilation or (1, 1)), feature_group_count)


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
    weight_grad: str = "auto",
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
      weight_grad: how the kernel gradient is computed, one of ``CONV_WEIGHT_GRADS`` (plain convolutions;
        see ``im2col_weight_grad_conv``).
      name: the layer's name in the parameter tree.
    """
    shared = dict(feature_group_count=groups, use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init,
                  dtype=dtype, name=name)
    if deformable:
        return ModulatedDeformConv(features, kernel_size, stride, **shared)
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), (stride, stride), padding=((pad, pad), (pad, pad)),
                   conv_general_dilated=functools.partial(im2col_weight_grad_conv, weight_grad=weight_grad), **shared)
