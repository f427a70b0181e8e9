"""Modulated deformable convolution (DCNv2, Zhu et al. 2019) in plain JAX.

Each of the K = kh * kw kernel taps of output pixel (y, x) reads the input at its regular position
``(y * stride - padding + i * dilation, x * stride - padding + j * dilation)`` plus a learned offset
``(dy, dx)``, by bilinear interpolation with zeros outside the feature map, and multiplies it by a
learned mask in [0, 1]. The sampled taps ("columns") then meet the kernel in one matmul (a grouped
1x1 convolution for grouped kernels).

Offsets and masks are predicted from the same input by a plain convolution (``conv_offset``), zero
by default (mmcv's ``ModulatedDeformConv2dPack``: a fresh layer is the plain convolution scaled by
0.5). The official ATSS code (maskrcnn-benchmark's ``DFConv2d``) starts it elsewhere, differently per
site: ``DFCONV2D_OFFSET_KERNEL_INIT`` in the backbone, the head's N(0, 0.01) in the head (see
``resnet.py`` and ``head.py``). Pretrained plain-conv weights load into ``kernel`` unchanged. Its 3K
output channels follow mmcv and maskrcnn-benchmark:
``[dy_0, dx_0, dy_1, dx_1, ..., dy_{K-1}, dx_{K-1}, mask_0, ..., mask_{K-1}]`` (masks before the
sigmoid), taps in row-major order, so their DCNv2 weights convert by transposing kernels only.

The sampling positions are float32 whatever the compute dtype: bfloat16 cannot address pixel 300.5.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# maskrcnn-benchmark's DFConv2d (atss_core/layers/misc.py) initialises its offset/mask convolution with
# ``kaiming_uniform_(a=1)``: U(-b, b), b = sqrt(3 / fan_in), fan_in = C_in * kh * kw (that conv is never
# grouped); its bias is zero.
DFCONV2D_OFFSET_KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
# ... and its ModulatedDeformConv kernel with U(-b, b), b = 1 / sqrt(C_in * kh * kw) (``reset_parameters``),
# bias zero. (For an ungrouped kernel; the official formula uses all C_in channels even when grouped.)
DFCONV2D_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def bilinear_sample(features: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
    """Samples ``features`` at continuous positions, zero outside (each of the 4 corners that falls outside
    contributes nothing, so a position within one pixel of the border fades out, as DCN's CUDA kernels).

    Args:
      features: ``[B, H, W, C]``.
      y, x: ``[B, ...]`` float32 positions in pixels (pixel centres at integers).

    Returns:
      ``[B, ..., C]`` in the dtype of ``features``.
    """
    batch, height, width, channels = features.shape
    flat = features.reshape(batch, height * width, channels)
    y0, x0 = jnp.floor(y), jnp.floor(x)
    result = jnp.zeros((*y.shape, channels), features.dtype)
    for corner_y, weight_y in ((y0, 1.0 - (y - y0)), (y0 + 1.0, y - y0)):
        for corner_x, weight_x in ((x0, 1.0 - (x - x0)), (x0 + 1.0, x - x0)):
            inside = (corner_y >= 0) & (corner_y <= height - 1) & (corner_x >= 0) & (corner_x <= width - 1)
            index = (jnp.clip(corner_y, 0, height - 1) * width + jnp.clip(corner_x, 0, width - 1)).astype(jnp.int32)
            values = jax.vmap(lambda rows, idx: rows[idx.reshape(-1)])(flat, index).reshape(result.shape)
            weight = jnp.where(inside, weight_y * weight_x, 0.0).astype(features.dtype)
            result = result + values * weight[..., None]
    return result


def modulated_deform_conv(
    inputs: jax.Array,
    offsets: jax.Array,
    mask: jax.Array,
    kernel: jax.Array,
    *,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
    feature_group_count: int = 1,
) -> jax.Array:
    """DCNv2 with one offset field shared by all channels (``deform_groups=1``, as the paper's configs).

    Args:
      inputs: ``[B, H, W, C_in]``.
      offsets: ``[B, H_out, W_out, K, 2]`` (dy, dx) in input pixels per tap, taps row-major.
      mask: ``[B, H_out, W_out, K]`` modulation (after the sigmoid).
      kernel: ``[kh, kw, C_in / groups, C_out]`` (flax's HWIO layout).
      stride, padding, dilation: as a plain convolution's (symmetric padding).
      feature_group_count: grouped convolution (ResNeXt); output channels grouped contiguously.

    Returns:
      ``[B, H_out, W_out, C_out]``; with zero offsets and unit mask the plain convolution (up to the order of
      the sums).
    """
    kernel_h, kernel_w, group_in, out_channels = kernel.shape
    batch, height, width, in_channels = inputs.shape
    out_h = (height + 2 * padding - dilation * (kernel_h - 1) - 1) // stride + 1
    out_w = (width + 2 * padding - dilation * (kernel_w - 1) - 1) // stride + 1
    taps = kernel_h * kernel_w
    groups = feature_group_count
    if in_channels != group_in * groups or out_channels % groups:
        raise ValueError(f"kernel {kernel.shape} does not fit {in_channels} input channels in {groups} groups")
    if offsets.shape != (batch, out_h, out_w, taps, 2) or mask.shape != (batch, out_h, out_w, taps):
        raise ValueError(f"offsets {offsets.shape} and mask {mask.shape} must be {(batch, out_h, out_w, taps, 2)} "
                         f"and {(batch, out_h, out_w, taps)}")
    tap_y, tap_x = jnp.meshgrid(jnp.arange(kernel_h), jnp.arange(kernel_w), indexing="ij")
    base_y = jnp.arange(out_h)[:, None] * stride - padding + tap_y.reshape(-1) * dilation  # [H_out, K]
    base_x = jnp.arange(out_w)[:, None] * stride - padding + tap_x.reshape(-1) * dilation  # [W_out, K]
    offsets = offsets.astype(jnp.float32)
    y = base_y[None, :, None, :] + offsets[..., 0]
    x = base_x[None, None, :, :] + offsets[..., 1]
    columns = bilinear_sample(inputs, y, x) * mask[..., None].astype(inputs.dtype)  # [B, H_out, W_out, K, C_in]
    kernel = kernel.astype(inputs.dtype)
    if groups == 1:
        return jnp.einsum("bhwkc,kco->bhwo", columns, kernel.reshape(taps, in_channels, out_channels))
    # Grouped: each group's (tap, channel) columns side by side, then a grouped 1x1 convolution. (An einsum
    # with the group as a batch axis is 6x slower on XLA:CPU.)
    columns = columns.reshape(batch, out_h, out_w, taps, groups, group_in).transpose(0, 1, 2, 4, 3, 5)
    columns = columns.reshape(batch, out_h, out_w, groups * taps * group_in)
    return jax.lax.conv_general_dilated(columns, kernel.reshape(1, 1, taps * group_in, out_channels), (1, 1),
                                        "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups)


class ModulatedDeformConv(nn.Module):
    """A drop-in for a square ``nn.Conv`` with symmetric padding: same ``kernel`` (and ``bias``) parameters,
    plus ``conv_offset`` (3K channels) predicting the offsets and masks, initialised by
    ``offset_kernel_init`` and ``offset_bias_init`` (zero by default)."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    dilation: int = 1
    feature_group_count: int = 1
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    offset_kernel_init: Callable = nn.initializers.zeros
    offset_bias_init: Callable = nn.initializers.zeros
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        size, taps = self.kernel_size, self.kernel_size**2
        padding = self.dilation * (size - 1) // 2
        in_channels = inputs.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (size, size, in_channels // self.feature_group_count,
                                                         self.features))
        offset_and_mask = nn.Conv(
            3 * taps, (size, size), (self.stride, self.stride), padding=((padding, padding), (padding, padding)),
            kernel_dilation=(self.dilation, self.dilation), kernel_init=self.offset_kernel_init,
            bias_init=self.offset_bias_init, dtype=self.dtype, name="conv_offset")(inputs)
        batch, out_h, out_w, _ = offset_and_mask.shape
        offsets = offset_and_mask[..., : 2 * taps].reshape(batch, out_h, out_w, taps, 2)
        mask = jax.nn.sigmoid(offset_and_mask[..., 2 * taps :].astype(jnp.float32))
        out = modulated_deform_conv(
            inputs.astype(self.dtype), offsets, mask, kernel, stride=self.stride, padding=padding,
            dilation=self.dilation, feature_group_count=self.feature_group_count)
        if self.use_bias:
            out = out + self.param("bias", self.bias_init, (self.features,)).astype(self.dtype)
        return out
