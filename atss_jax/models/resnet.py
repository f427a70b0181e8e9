"""ResNet and ResNeXt backbones (torchvision layout, v1.5: stride on the 3x3 conv) returning C3, C4, C5.

ResNeXt-101 32x8d and 64x4d are ``ResNet(depth=101, groups=32, width_per_group=8)`` and
``(groups=64, width_per_group=4)``: torchvision's bottleneck with a grouped 3x3 convolution of
``int(planes * width_per_group / 64) * groups`` channels. ``deformable_stages`` turns the 3x3
convolutions of those stages into modulated deformable convolutions (DCNv2; the paper's DCN rows use
stages 2-4, i.e. C3-C5), whose offset predictors start at zero on top of the pretrained kernels.

Convolutions pad symmetrically as torchvision does (``kernel // 2``), so every stride-2 layer maps
``n`` to ``ceil(n / 2)`` pixels, as ``anchors.feature_size`` assumes, and converted torchvision
weights give the same features.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from atss_jax.models.deform_conv import ModulatedDeformConv

NORMS = ("frozen_bn", "bn", "gn")
STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# He (fan-out) initialisation, as torchvision.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine (ImageNet-pretrained backbones), nothing trained.

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
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        return (x * multiplier.astype(x.dtype) + (bias - mean * multiplier).astype(x.dtype)).astype(x.dtype)


class GroupNorm(nn.Module):
    """GroupNorm with 32 groups (fewer when a narrow test model has fewer than 32 channels)."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.GroupNorm(num_groups=min(32, x.shape[-1]), epsilon=1e-5, dtype=self.dtype, name="norm")(x)


def make_norm(kind: str, train: bool, dtype: jnp.dtype, axis_name: str | None = None) -> Callable[..., nn.Module]:
    """A norm-layer factory: frozen BN, trainable BN (synced over ``axis_name``) or GroupNorm(32)."""
    if kind == "frozen_bn":
        return FrozenBatchNorm
    if kind == "bn":
        return functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, axis_name=axis_name
        )
    if kind == "gn":
        return functools.partial(GroupNorm, dtype=dtype)
    raise ValueError(f"backbone norm {kind!r} is not one of {NORMS}")


def _conv(features: int, kernel: int, stride: int, dtype: jnp.dtype, name: str, groups: int = 1,
          deformable: bool = False) -> nn.Module:
    if deformable:
        return ModulatedDeformConv(features, kernel, stride, feature_group_count=groups, use_bias=False,
                                   kernel_init=conv_init, dtype=dtype, name=name)
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        (stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        name=name,
    )


class BasicBlock(nn.Module):
    features: int
    stride: int
    norm: Callable[..., nn.Module]
    dtype: jnp.dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(self.norm(name="bn1")(_conv(self.features, 3, self.stride, self.dtype, "conv1")(x)))
        y = self.norm(name="bn2")(_conv(self.features, 3, 1, self.dtype, "conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = self.norm(name="downsample_bn")(_conv(self.features, 1, self.stride, self.dtype, "downsample_conv")(x))
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    features: int
    stride: int
    norm: Callable[..., nn.Module]
    dtype: jnp.dtype = jnp.float32
    groups: int = 1
    width_per_group: int = 64
    deformable: bool = False
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.features * self.expansion
        inner = int(self.features * self.width_per_group / 64) * self.groups
        y = nn.relu(self.norm(name="bn1")(_conv(inner, 1, 1, self.dtype, "conv1")(x)))
        conv2 = _conv(inner, 3, self.stride, self.dtype, "conv2", self.groups, self.deformable)
        y = nn.relu(self.norm(name="bn2")(conv2(y)))
        y = self.norm(name="bn3")(_conv(out, 1, 1, self.dtype, "conv3")(y))
        if self.stride != 1 or x.shape[-1] != out:
            x = self.norm(name="downsample_bn")(_conv(out, 1, self.stride, self.dtype, "downsample_conv")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 (and ResNeXt) trunk: ``image [B, H, W, 3] -> (C3, C4, C5)`` at strides 8, 16, 32.

    Attributes:
      depth: 18, 34, 50 or 101.
      groups, width_per_group: ResNeXt's cardinality and bottleneck width (1 and 64 = ResNet).
      deformable_stages: stages (1-4, torchvision's ``layer{n}``) whose 3x3 convolutions are DCNv2;
        bottleneck networks only.
      norm: "frozen_bn" (pretrained, the COCO default), "bn" (trainable) or "gn" (from scratch).
      frozen_stages: 0 trains everything; 1 freezes the stem; 2 the stem and the first stage
        (gradients stopped at their output).
      width: channels of the first stage (64 for the standard networks; smaller for tests).
      dtype: computation dtype (parameters stay float32).
    """

    depth: int = 50
    norm: str = "frozen_bn"
    frozen_stages: int = 2
    width: int = 64
    groups: int = 1
    width_per_group: int = 64
    deformable_stages: Sequence[int] = ()
    dtype: jnp.dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, image: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"ResNet depth {self.depth} is not one of {sorted(STAGE_SIZES)}")
        if not set(self.deformable_stages) <= {1, 2, 3, 4}:
            raise ValueError(f"deformable_stages={tuple(self.deformable_stages)}: stages are numbered 1-4")
        if self.depth < 50 and (self.groups != 1 or self.width_per_group != 64 or self.deformable_stages):
            raise ValueError(f"ResNet-{self.depth} has basic blocks: groups, width_per_group and deformable_stages "
                             "need a bottleneck network (depth 50 or 101)")
        norm = make_norm(self.norm, train, self.dtype, self.axis_name)
        if self.depth < 50:
            block = BasicBlock
        else:
            block = functools.partial(Bottleneck, groups=self.groups, width_per_group=self.width_per_group)
        x = nn.relu(norm(name="bn1")(_conv(self.width, 7, 2, self.dtype, "conv1")(image.astype(self.dtype))))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        if self.frozen_stages >= 1:
            x = jax.lax.stop_gradient(x)
        outputs = []
        for stage, num_blocks in enumerate(STAGE_SIZES[self.depth]):
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                options = {"deformable": True} if stage + 1 in self.deformable_stages else {}
                x = block(self.width * 2**stage, stride, norm, self.dtype, name=f"layer{stage + 1}_{index}",
                          **options)(x)
            if stage + 2 <= self.frozen_stages:
                x = jax.lax.stop_gradient(x)
            outputs.append(x)
        return tuple(outputs[1:])


def stage_channels(depth: int, width: int = 64) -> Sequence[int]:
    """Channels of C3, C4, C5."""
    expansion = 1 if depth < 50 else 4
    return tuple(width * 2**stage * expansion for stage in (1, 2, 3))
