"""The ATSS head, shared across FPN levels: classification, box regression and centre-ness."""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from atss_jax.boxes import REGRESSIONS
from atss_jax.models.deform_conv import ModulatedDeformConv
from atss_jax.models.resnet import GroupNorm

head_init = nn.initializers.normal(0.01)


class Scale(nn.Module):
    """A learnable scalar (init 1.0), one per level on the box output."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.param("scale", nn.initializers.ones, ()).astype(x.dtype)


class ATSSHead(nn.Module):
    """Per level: a classification tower and a box tower of ``num_convs`` x (3x3 conv, GN, ReLU).

    Outputs, each flattened in the anchors' ``(y, x, anchor)`` order and concatenated over levels:
    ``class_logits [B, A, C]``, ``box_regression [B, A, 4]`` (deltas for ``regression="box"``;
    non-negative LTRB distances in strides for ``"point"``) and ``centerness_logits [B, A]``
    (zeros when ``use_centerness`` is off).

    Attributes: the paper's Table 1 switches are ``use_group_norm``, ``use_centerness`` and
    ``use_scales``; ``anchors_per_location`` is #A; ``deformable_tower`` makes the last conv of each
    tower a DCNv2 (the official ``dcnv2`` configs, Table 8).
    """

    num_classes: int
    anchors_per_location: int = 1
    features: int = 256
    num_convs: int = 4
    regression: str = "box"
    use_group_norm: bool = True
    use_centerness: bool = True
    use_scales: bool = True
    deformable_tower: bool = False
    prior_prob: float = 0.01
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, levels: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        if self.regression not in REGRESSIONS:
            raise ValueError(f"model.head.regression={self.regression!r} is not one of {REGRESSIONS}")

        def conv(features: int, name: str, bias_init=nn.initializers.zeros) -> nn.Conv:
            return nn.Conv(
                features,
                (3, 3),
                padding=((1, 1), (1, 1)),
                kernel_init=head_init,
                bias_init=bias_init,
                dtype=self.dtype,
                name=name,
            )

        def tower(name: str) -> list[nn.Module]:
            layers = []
            for i in range(self.num_convs):
                if self.deformable_tower and i == self.num_convs - 1:
                    layers.append(ModulatedDeformConv(self.features, kernel_init=head_init, dtype=self.dtype,
                                                      name=f"{name}_conv{i}"))
                else:
                    layers.append(conv(self.features, f"{name}_conv{i}"))
                if self.use_group_norm:
                    layers.append(GroupNorm(self.dtype, name=f"{name}_norm{i}"))
                layers.append(nn.relu)
            return layers

        num_anchors = self.anchors_per_location
        class_tower, box_tower = tower("cls"), tower("box")
        prior_bias = nn.initializers.constant(-math.log((1 - self.prior_prob) / self.prior_prob))
        class_out = conv(num_anchors * self.num_classes, "cls_logits", prior_bias)
        box_out = conv(num_anchors * 4, "bbox_pred")
        center_out = conv(num_anchors, "centerness") if self.use_centerness else None
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
