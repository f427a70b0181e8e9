"""The ATSS head, shared across FPN levels: classification, box regression and centre-ness."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from atss_jax.boxes import REGRESSIONS
from atss_jax.models.deform_conv import DFCONV2D_KERNEL_INIT, ModulatedDeformConv
from atss_jax.models.layers import ModuleDef

# N(0, 0.01) and zero bias for every head convolution, the official code's initialisation. The official loop
# (``for l in tower.modules(): if isinstance(l, nn.Conv2d)``) also reaches the offset/mask conv inside a DCN
# tower layer (DFConv2d.offset, a Conv2d subclass), but not the deformable kernel itself (ModulatedDeformConv is
# a plain Module), which keeps DFConv2d's own U(+-1 / sqrt(9 C)) and zero bias.
KERNEL_INIT = nn.initializers.normal(0.01)
# REGRESSION_TYPE 'POINT' starts every LTRB distance at 4 strides (before the scale and the ReLU): each location's
# first box is its 8-stride square anchor, and the ReLU passes gradients from the start. 'BOX' deltas start at 0.
POINT_BIAS_INIT = nn.initializers.constant(4.0)


class Scale(nn.Module):
    """A learnable scalar (init 1.0), one per level on the box output."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.param("scale", nn.initializers.ones, ()).astype(x.dtype)


class ATSSHead(nn.Module):
    """Per level: a classification tower and a box tower of ``num_convs`` x (3x3 conv, norm, ReLU).

    ``levels``: the FPN's ``[B, H_l, W_l, features]``. Outputs, each flattened in the anchors'
    ``(y, x, anchor)`` order and concatenated over levels, float32: ``class_logits [B, A, C]``,
    ``box_regression [B, A, 4]`` (deltas for ``regression="box"``; non-negative LTRB distances in
    strides for ``"point"``, one anchor per location, starting near 4) and ``centerness_logits [B, A]``
    (zeros when ``use_centerness`` is off).

    Initialisation is the official code's: every convolution N(0, 0.01) with zero bias, except the
    classifier's bias (``prior_prob``), the box bias for ``"point"`` (4) and the deformable tower
    layers, whose kernel is U(+-1 / sqrt(9 C)) and whose offset/mask conv is N(0, 0.01).

    Attributes:
      num_classes: C; ``anchors_per_location``: #A.
      features, num_convs: width and depth of each tower.
      regression: one of ``boxes.REGRESSIONS``.
      use_centerness, use_scales: two of the paper's Table 1 switches (the third is ``norm``).
      deformable_tower: the last conv of each tower is DCNv2 (the official ``dcnv2`` configs, Table 8).
      prior_prob: initial foreground probability of every classifier output.
      conv: ``layers.conv`` with the compute dtype bound.
      norm: the towers' norm constructor (GroupNorm), or None for none.
    """

    num_classes: int
    anchors_per_location: int
    features: int
    num_convs: int
    regression: str
    use_centerness: bool
    use_scales: bool
    deformable_tower: bool
    prior_prob: float
    conv: ModuleDef
    norm: ModuleDef | None

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.regression not in REGRESSIONS:
            raise ValueError(f"model.head.regression={self.regression!r} is not one of {REGRESSIONS}")
        if self.regression == "point" and self.anchors_per_location != 1:
            raise ValueError(f"model.head.regression='point' regresses from one point per location, not "
                             f"{self.anchors_per_location} anchors")
        conv = functools.partial(self.conv, kernel_size=3, kernel_init=KERNEL_INIT)

        def tower(name: str) -> list[nn.Module]:
            layers = []
            for i in range(self.num_convs):
                if self.deformable_tower and i == self.num_convs - 1:
                    # Built here, not by ``self.conv``, for its initialisers; it computes in its input's dtype,
                    # the compute dtype (the FPN's and the tower's layers output it).
                    layers.append(ModulatedDeformConv(
                        self.features, 3, kernel_init=DFCONV2D_KERNEL_INIT, offset_kernel_init=KERNEL_INIT,
                        dtype=levels[0].dtype, name=f"{name}_conv{i}"))
                else:
                    layers.append(conv(self.features, name=f"{name}_conv{i}"))
                if self.norm is not None:
                    layers.append(self.norm(name=f"{name}_norm{i}"))
                layers.append(nn.relu)
            return layers

        num_anchors = self.anchors_per_location
        class_tower, box_tower = tower("cls"), tower("box")
        prior_bias = nn.initializers.constant(-math.log((1 - self.prior_prob) / self.prior_prob))
        class_out = conv(num_anchors * self.num_classes, bias_init=prior_bias, name="cls_logits")
        box_bias = POINT_BIAS_INIT if self.regression == "point" else nn.initializers.zeros
        box_out = conv(num_anchors * 4, bias_init=box_bias, name="bbox_pred")
        center_out = conv(num_anchors, name="centerness") if self.use_centerness else None
        scales = [Scale(name=f"scale{i}") for i in range(len(levels))] if self.use_scales else None

        class_logits, box_regression, centerness = [], [], []
        for index, feature in enumerate(levels):
            batch = feature.shape[0]
            cls_feature, box_feature = feature, feature
            for layer in class_tower:
                cls_feature = layer(cls_feature)
            for layer in box_tower:
                box_feature = layer(box_feature)
            boxes = box_out(box_feature)
            if scales is not None:
                boxes = scales[index](boxes)
            if self.regression == "point":
                boxes = nn.relu(boxes)
            class_logits.append(class_out(cls_feature).reshape(batch, -1, self.num_classes))
            box_regression.append(boxes.reshape(batch, -1, 4))
            if center_out is not None:
                centerness.append(center_out(box_feature).reshape(batch, -1))
            else:
                centerness.append(jnp.zeros((batch, boxes.shape[1] * boxes.shape[2] * num_anchors), boxes.dtype))
        return (
            jnp.concatenate(class_logits, 1).astype(jnp.float32),
            jnp.concatenate(box_regression, 1).astype(jnp.float32),
            jnp.concatenate(centerness, 1).astype(jnp.float32),
        )
