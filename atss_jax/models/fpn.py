"""Feature pyramid P3-P7 on C3-C5 (ATSS / RetinaNet style)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# Kaiming-uniform with a = 1, the FPN initialisation of the official code.
fpn_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")


class FPN(nn.Module):
    """``(C3, C4, C5) -> (P3, P4, P5, P6, P7)``, all with ``features`` channels.

    1x1 laterals, nearest top-down upsampling (cropped to the lateral's size, which is what
    ceil-halving strides need), 3x3 outputs; P6 a stride-2 3x3 conv on P5, P7 one on ReLU(P6).
    """

    features: int = 256
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, c3: jax.Array, c4: jax.Array, c5: jax.Array) -> tuple[jax.Array, ...]:
        def conv(kernel: int, stride: int, name: str) -> nn.Conv:
            pad = kernel // 2
            return nn.Conv(
                self.features,
                (kernel, kernel),
                (stride, stride),
                padding=((pad, pad), (pad, pad)),
                kernel_init=fpn_init,
                dtype=self.dtype,
                name=name,
            )

        laterals = [conv(1, 1, f"lateral{i}")(c) for i, c in zip((3, 4, 5), (c3, c4, c5))]
        for i in (1, 0):
            upper = laterals[i + 1]
            upsampled = jnp.repeat(jnp.repeat(upper, 2, axis=1), 2, axis=2)
            laterals[i] = laterals[i] + upsampled[:, : laterals[i].shape[1], : laterals[i].shape[2]]
        p3, p4, p5 = (conv(3, 1, f"output{i}")(x) for i, x in zip((3, 4, 5), laterals))
        p6 = conv(3, 2, "p6")(p5)
        p7 = conv(3, 2, "p7")(nn.relu(p6))
        return p3, p4, p5, p6, p7
