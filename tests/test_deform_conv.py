"""DCNv2 against a loop-by-loop numpy reference, finite differences, and plain/shifted convolutions."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atss_jax.models.deform_conv import ModulatedDeformConv, modulated_deform_conv


def _bilinear(image: np.ndarray, y: float, x: float) -> np.ndarray:
    """One position of one [H, W, C] image, zero outside, corner by corner (float64)."""
    height, width, channels = image.shape
    value = np.zeros(channels)
    y_low, x_low = int(np.floor(y)), int(np.floor(x))
    for corner_y in (y_low, y_low + 1):
        for corner_x in (x_low, x_low + 1):
            if 0 <= corner_y < height and 0 <= corner_x < width:
                weight = (1 - abs(y - corner_y)) * (1 - abs(x - corner_x))
                value += weight * image[corner_y, corner_x]
    return value


def reference_deform_conv(inputs, offsets, mask, kernel, stride, padding, dilation, groups):
    """The definition, one output pixel, tap and group at a time."""
    inputs, offsets, mask, kernel = (np.asarray(a, np.float64) for a in (inputs, offsets, mask, kernel))
    batch = inputs.shape[0]
    kernel_h, kernel_w, group_in, out_channels = kernel.shape
    group_out = out_channels // groups
    _, out_h, out_w, _, _ = offsets.shape
    out = np.zeros((batch, out_h, out_w, out_channels))
    for b in range(batch):
        for oy in range(out_h):
            for ox in range(out_w):
                for i in range(kernel_h):
                    for j in range(kernel_w):
                        tap = i * kernel_w + j
                        dy, dx = offsets[b, oy, ox, tap]
                        y = oy * stride - padding + i * dilation + dy
                        x = ox * stride - padding + j * dilation + dx
                        sample = _bilinear(inputs[b], y, x) * mask[b, oy, ox, tap]
                        for g in range(groups):
                            columns = sample[g * group_in:(g + 1) * group_in]
                            weights = kernel[i, j, :, g * group_out:(g + 1) * group_out]
                            out[b, oy, ox, g * group_out:(g + 1) * group_out] += columns @ weights
    return out


def _case(seed, *, size=(6, 7), in_channels=4, out_channels=6, stride=1, dilation=1, groups=1, offset_scale=1.5):
    rng = np.random.default_rng(seed)
    height, width = size
    padding = dilation
    out_h = (height + 2 * padding - 2 * dilation - 1) // stride + 1
    out_w = (width + 2 * padding - 2 * dilation - 1) // stride + 1
    inputs = rng.normal(size=(2, height, width, in_channels)).astype(np.float32)
    # Offsets up to a few pixels: many taps land between pixels, some outside the map.
    offsets = (rng.normal(size=(2, out_h, out_w, 9, 2)) * offset_scale).astype(np.float32)
    mask = rng.uniform(size=(2, out_h, out_w, 9)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, in_channels // groups, out_channels)).astype(np.float32)
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    return inputs, offsets, mask, kernel, options


def _deform(inputs, offsets, mask, kernel, options):
    return modulated_deform_conv(inputs, offsets, mask, kernel, stride=options["stride"],
                                 padding=options["padding"], dilation=options["dilation"],
                                 feature_group_count=options["groups"])


def _plain_conv(inputs, kernel, stride, padding, dilation, groups):
    return jax.lax.conv_general_dilated(
        inputs, kernel, (stride, stride), ((padding, padding), (padding, padding)), rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("stride,dilation,groups", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 1, 2)])
def test_forward_matches_the_loop_reference(stride, dilation, groups):
    inputs, offsets, mask, kernel, options = _case(stride + 3 * dilation + 7 * groups, stride=stride,
                                                   dilation=dilation, groups=groups)
    got = _deform(inputs, offsets, mask, kernel, options)
    want = reference_deform_conv(inputs, offsets, mask, kernel, **options)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups", [1, 2])
def test_gradients_match_finite_differences_of_the_reference(groups):
    inputs, offsets, mask, kernel, options = _case(11 + groups, size=(5, 5), groups=groups)
    # Sampling positions stay away from whole pixels, where bilinear interpolation has kinks.
    offsets = np.where(np.abs(offsets - np.round(offsets)) < 0.05, offsets + 0.1, offsets).astype(np.float32)
    cotangent = np.random.default_rng(0).normal(size=(2, 5, 5, 6))
    arguments = [inputs, offsets, mask, kernel]

    def loss(*args):
        return jnp.sum(_deform(*args, options) * cotangent)

    gradients = jax.grad(loss, argnums=(0, 1, 2, 3))(*arguments)
    rng = np.random.default_rng(1)
    epsilon = 1e-4
    for which, (argument, gradient) in enumerate(zip(arguments, gradients)):
        for _ in range(6):
            index = tuple(rng.integers(0, n) for n in argument.shape)
            plus, minus = [a.astype(np.float64) for a in arguments], [a.astype(np.float64) for a in arguments]
            plus[which][index] += epsilon
            minus[which][index] -= epsilon
            numeric = (np.sum(reference_deform_conv(*plus, **options) * cotangent)
                       - np.sum(reference_deform_conv(*minus, **options) * cotangent)) / (2 * epsilon)
            assert gradient[index] == pytest.approx(numeric, rel=1e-3, abs=1e-3), (which, index)


@pytest.mark.parametrize("stride,dilation,groups", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_zero_offsets_and_unit_mask_equal_a_plain_convolution(stride, dilation, groups):
    inputs, offsets, mask, kernel, options = _case(5, size=(9, 8), stride=stride, dilation=dilation, groups=groups)
    got = _deform(inputs, np.zeros_like(offsets), np.ones_like(mask), kernel, options)
    want = _plain_conv(inputs, kernel, **options)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dy,dx", [(1, 0), (0, -1), (-1, 1)])
def test_offsets_of_one_pixel_equal_a_shifted_convolution(dy, dx):
    inputs, offsets, mask, kernel, options = _case(6, size=(7, 9))
    shift = np.broadcast_to(np.array([dy, dx], np.float32), offsets.shape)
    got = _deform(inputs, shift, np.ones_like(mask), kernel, options)
    # Reading (y + dy, x + dx) everywhere = the plain convolution's output moved by (dy, dx); one more pixel
    # of zero padding supplies the outputs just outside the map.
    height, width = inputs.shape[1:3]
    wider = _plain_conv(inputs, kernel, stride=1, padding=2, dilation=1, groups=1)  # [B, H + 2, W + 2, C]
    want = wider[:, 1 + dy:1 + dy + height, 1 + dx:1 + dx + width]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_fresh_layer_is_half_the_plain_convolution_and_learns_offsets():
    layer = ModulatedDeformConv(6, stride=2, feature_group_count=2)
    inputs = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 10, 4)), jnp.float32)
    variables = layer.init(jax.random.key(0), inputs)
    params = variables["params"]
    assert params["kernel"].shape == (3, 3, 2, 6)
    assert params["conv_offset"]["kernel"].shape == (3, 3, 4, 27)
    plain = _plain_conv(inputs, params["kernel"], 2, 1, 1, 2) + params["bias"]
    # Zero offsets, sigmoid(0) = 0.5 masks: half the plain convolution (plus the bias).
    np.testing.assert_allclose(layer.apply(variables, inputs), 0.5 * (plain - params["bias"]) + params["bias"],
                               rtol=1e-5, atol=1e-5)
    gradient = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, inputs) ** 2))(params)
    assert float(jnp.abs(gradient["conv_offset"]["kernel"]).max()) > 0  # the offsets will move


def test_bfloat16_layer_keeps_float32_positions():
    layer = ModulatedDeformConv(8, dtype=jnp.bfloat16)
    inputs = jnp.asarray(np.random.default_rng(3).normal(size=(1, 300, 5, 8)), jnp.float32)
    variables = layer.init(jax.random.key(0), inputs)
    out16 = layer.apply(variables, inputs)
    out32 = ModulatedDeformConv(8).apply(variables, inputs)
    assert out16.dtype == jnp.bfloat16
    # Rows far from the origin are sampled where they should be (bf16 positions would be off by pixels).
    np.testing.assert_allclose(np.asarray(out16[:, 250:], np.float32), np.asarray(out32[:, 250:]), rtol=0.05,
                               atol=0.05)


def test_mismatched_offsets_are_named():
    inputs, offsets, mask, kernel, options = _case(8)
    with pytest.raises(ValueError, match="offsets"):
        _deform(inputs, offsets[:, :-1], mask, kernel, options)
    with pytest.raises(ValueError, match="groups"):
        _deform(inputs, offsets, mask, kernel, {**options, "groups": 3})


def test_used_as_an_nn_conv_drop_in():
    dense = nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)))
    deform = ModulatedDeformConv(6)
    inputs = jnp.ones((2, 5, 5, 3))
    assert jax.tree.map(jnp.shape, dense.init(jax.random.key(0), inputs)["params"]) == {
        k: v for k, v in jax.tree.map(jnp.shape, deform.init(jax.random.key(0), inputs)["params"]).items()
        if k != "conv_offset"}
