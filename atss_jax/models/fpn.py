"""Feature pyramid P3-P7 on C3-C5 (ATSS / RetinaNet style)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from atss_jax.models.layers import ModuleDef

# Kaiming-uniform with a = 1, the FPN initialisation of the official code.
KERNEL_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class FPN(nn.Module):
    """``(C3, C4, C5) -> (P3, P4, P5, P6, P7)``, all ``[B, H_l, W_l, features]`` (``H_l = ceil(H_{l-1} / 2)``).

    1x1 laterals, nearest top-down upsampling (cropped to the lateral's size, which is what
    ceil-halving strides need), 3x3 outputs; P6 a stride-2 3x3 conv on P5, P7 one on ReLU(P6) (the official
    LastLevelP6P7) or, without ``relu_before_p7``, on P6 (mmdetection's ``relu_before_extra_convs=False``).

    Attributes:
      features: channels of every level.
      conv: ``layers.conv`` with the compute dtype bound.
      relu_before_p7: P7's conv takes ReLU(P6) rather than P6.
    """

    features: int
    conv: ModuleDef
    relu_before_p7: bool = True

    @nn.compact
    def __call__(self, c3: jax.Array, c4: jax.Array, c5: jax.Array) -> tuple[jax.Array, ...]:
        conv = functools.partial(self.conv, self.features, kernel_init=KERNEL_INIT)
        laterals = [conv(1, name=f"lateral{i}")(c) for i, c in zip((3, 4, 5), (c3, c4, c5))]
        for i in (1, 0):
            upper = laterals[i + 1]
            upsampled = jnp.repeat(jnp.repeat(upper, 2, axis=1), 2, axis=2)
            laterals[i] = laterals[i] + upsampled[:, : laterals[i].shape[1], : laterals[i].shape[2]]
        p3, p4, p5 = (conv(3, name=f"output{i}")(x) for i, x in zip((3, 4, 5), laterals))
        p6 = conv(3, 2, name="p6")(p5)
        p7 = conv(3, 2, name="p7")(nn.relu(p6) if self.relu_before_p7 else p6)
        return p3, p4, p5, p6, p7
