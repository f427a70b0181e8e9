"""ResNet and ResNeXt backbones (torchvision layout) returning C3, C4, C5.

A bottleneck strides in its 3x3 convolution (torchvision's v1.5, FAIR's Caffe2 ResNeXts) or, with
``stride_in_1x1``, in its first 1x1 (the original ResNet: MSRA's weights, Detectron's ``R-50.pkl`` and
``R-101.pkl``, which the official ATSS models start from); the weights have the same shapes either way.

ResNeXt-101 32x8d and 64x4d are ``depth=101, groups=32, width_per_group=8`` and ``groups=64,
width_per_group=4``: torchvision's bottleneck with a grouped 3x3 convolution of
``int(planes * width_per_group / 64) * groups`` channels. ``deformable_stages`` turns the 3x3
convolutions of those stages into modulated deformable convolutions (DCNv2; the paper's DCN rows use
stages 2-4, i.e. C3-C5), whose offset predictors start as the official code's do (kaiming-uniform,
not zero) on top of the pretrained kernels.

The convolutions (``layers.conv``: torchvision's padding, so converted torchvision weights give the
same features) and the norm (``layers.make_norm``) are injected, as ``ModuleDef``s.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax

from atss_jax.models.deform_conv import DFCONV2D_OFFSET_KERNEL_INIT, ModulatedDeformConv
from atss_jax.models.layers import ModuleDef, NormFactory

STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
# He (fan-out) initialisation, as torchvision.
KERNEL_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
    """``x [B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), features]``: two 3x3 convolutions
    and a shortcut (1x1 convolution where the shape changes).

    Attributes:
      features, stride: output channels; 2 halves the resolution.
      conv, norm: bias-free convolution and norm-layer constructors.
    """

    features: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = nn.relu(self.norm(name="bn1")(self.conv(self.features, 3, self.stride, name="conv1")(x)))
        y = self.norm(name="bn2")(self.conv(self.features, 3, name="conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = self.norm(name="downsample_bn")(self.conv(self.features, 1, self.stride, name="downsample_conv")(x))
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """``x [B, H, W, C] -> [B, ceil(H / stride), ceil(W / stride), 4 * features]``: 1x1, 3x3 (strided,
    grouped, optionally deformable), 1x1 convolutions and a shortcut (1x1 convolution where the shape
    changes).

    Attributes:
      features, stride: the block's planes (output channels / 4); 2 halves the resolution.
      conv, norm: bias-free convolution and norm-layer constructors.
      groups, width_per_group: ResNeXt's cardinality and bottleneck width (1 and 64 = ResNet).
      deformable: the 3x3 convolution is DCNv2.
      stride_in_1x1: the first 1x1 convolution strides instead of the 3x3.
    """

    features: int
    stride: int
    conv: ModuleDef
    norm: ModuleDef
    groups: int
    width_per_group: int
    deformable: bool
    stride_in_1x1: bool
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.features * self.expansion
        inner = int(self.features * self.width_per_group / 64) * self.groups
        stride_1x1, stride_3x3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        y = nn.relu(self.norm(name="bn1")(self.conv(inner, 1, stride_1x1, name="conv1")(x)))
        if self.deformable:
            # The official backbone's DFConv2d starts its offset/mask conv at kaiming_uniform(a=1), not at zero:
            # non-zero offsets, and masks away from 0.5, from the first step. ImageNet weights have no offsets,
            # so this survives loading them. Built here, not by ``self.conv``, to set that initialiser;
            # it computes in its input's dtype, the compute dtype (conv1 and bn1 output it).
            conv2 = ModulatedDeformConv(inner, 3, stride_3x3, feature_group_count=self.groups, use_bias=False,
                                        kernel_init=KERNEL_INIT, offset_kernel_init=DFCONV2D_OFFSET_KERNEL_INIT,
                                        dtype=y.dtype, name="conv2")
        else:
            conv2 = self.conv(inner, 3, stride_3x3, groups=self.groups, name="conv2")
        y = nn.relu(self.norm(name="bn2")(conv2(y)))
        y = self.norm(name="bn3")(self.conv(out, 1, name="conv3")(y))
        if self.stride != 1 or x.shape[-1] != out:
            x = self.norm(name="downsample_bn")(self.conv(out, 1, self.stride, name="downsample_conv")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 (and ResNeXt) trunk: ``image [B, H, W, 3] -> (C3, C4, C5)`` at strides 8, 16, 32,
    with ``stage_channels(depth, width)`` channels.

    Attributes:
      depth: 18, 34, 50 or 101.
      frozen_stages: 0 trains everything; 1 freezes the stem; 2 the stem and the first stage
        (gradients stopped at their output).
      width: channels of the first stage (64 for the standard networks; smaller for tests).
      groups, width_per_group: ResNeXt's cardinality and bottleneck width (1 and 64 = ResNet).
      deformable_stages: stages (1-4, torchvision's ``layer{n}``) whose 3x3 convolutions are DCNv2;
        bottleneck networks only.
      conv: ``layers.conv`` with the compute dtype bound.
      norm: ``train -> norm constructor`` (``layers.make_norm``).
      stride_in_1x1: bottlenecks stride in their first 1x1 convolution, not the 3x3 (MSRA's Caffe2
        ResNets).
    """

    depth: int
    frozen_stages: int
    width: int
    groups: int
    width_per_group: int
    deformable_stages: Sequence[int]
    conv: ModuleDef
    norm: NormFactory
    stride_in_1x1: bool

    @nn.compact
    def __call__(self, image: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.depth not in STAGE_SIZES:
            raise ValueError(f"ResNet depth {self.depth} is not one of {sorted(STAGE_SIZES)}")
        if not set(self.deformable_stages) <= {1, 2, 3, 4}:
            raise ValueError(f"deformable_stages={tuple(self.deformable_stages)}: stages are numbered 1-4")
        if self.depth < 50 and (self.groups != 1 or self.width_per_group != 64 or self.deformable_stages
                                or self.stride_in_1x1):
            raise ValueError(f"ResNet-{self.depth} has basic blocks: groups, width_per_group, deformable_stages "
                             "and stride_in_1x1 need a bottleneck network (depth 50 or 101)")
        # Every convolution is followed by a norm, whose shift makes a bias redundant.
        conv = functools.partial(self.conv, use_bias=False, kernel_init=KERNEL_INIT)
        norm = self.norm(train)
        x = nn.relu(norm(name="bn1")(conv(self.width, 7, 2, name="conv1")(image)))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        if self.frozen_stages >= 1:
            x = jax.lax.stop_gradient(x)
        outputs = []
        for stage, num_blocks in enumerate(STAGE_SIZES[self.depth]):
            if self.depth < 50:
                block = functools.partial(BasicBlock, conv=conv, norm=norm)
            else:
                block = functools.partial(Bottleneck, conv=conv, norm=norm, groups=self.groups,
                                          width_per_group=self.width_per_group,
                                          deformable=stage + 1 in self.deformable_stages,
                                          stride_in_1x1=self.stride_in_1x1)
            for index in range(num_blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                x = block(self.width * 2**stage, stride, name=f"layer{stage + 1}_{index}")(x)
            if stage + 2 <= self.frozen_stages:
                x = jax.lax.stop_gradient(x)
            outputs.append(x)
        return tuple(outputs[1:])


def stage_channels(depth: int, width: int) -> tuple[int, int, int]:
    """Channels of C3, C4, C5 of a ResNet of ``depth`` whose first stage has ``width`` channels."""
    expansion = (BasicBlock if depth < 50 else Bottleneck).expansion
    return tuple(width * 2**stage * expansion for stage in (1, 2, 3))
