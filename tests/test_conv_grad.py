"""The im2col-gradient convolution (layers.im2col_weight_grad_conv) against XLA's own convolution and its
gradients, for the shapes ResNet, ResNeXt, the FPN and the head use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atss_jax.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")


def _reference(lhs, rhs, stride, pad, dilation, groups):
    return jax.lax.conv_general_dilated(lhs, rhs, (stride, stride), [(pad, pad)] * 2, rhs_dilation=(dilation,) * 2,
                                        dimension_numbers=NHWC, feature_group_count=groups,
                                        precision=jax.lax.Precision.HIGHEST)


def _im2col(lhs, rhs, stride, pad, dilation, groups):
    dimension_numbers = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
    return layers.im2col_weight_grad_conv(lhs, rhs, (stride, stride), [(pad, pad)] * 2, (1, 1), (dilation,) * 2,
                                          dimension_numbers, groups, weight_grad="im2col")


@pytest.mark.parametrize("kernel, stride, pad, dilation, groups, size", [
    (3, 1, 1, 1, 1, (9, 12)),   # head towers, FPN outputs, bottleneck 3x3
    (3, 2, 1, 1, 1, (9, 12)),   # strided 3x3 (P6, P7, first bottleneck of a stage), odd sizes
    (1, 1, 0, 1, 1, (8, 8)),    # bottleneck 1x1, FPN laterals
    (1, 2, 0, 1, 1, (9, 11)),   # strided shortcut
    (7, 2, 3, 1, 1, (13, 10)),  # stem
    (3, 2, 1, 1, 4, (10, 9)),   # ResNeXt grouped 3x3
    (3, 1, 2, 2, 1, (11, 12)),  # dilated
])
def test_value_and_gradients_match_xla(kernel, stride, pad, dilation, groups, size):
    rng = np.random.default_rng(kernel * 100 + stride * 10 + groups)
    lhs = jnp.asarray(rng.normal(size=(2, *size, 8)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(kernel, kernel, 8 // groups, 12)), jnp.float32)
    args = (stride, pad, dilation, groups)
    want = _reference(lhs, rhs, *args)
    got = _im2col(lhs, rhs, *args)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)

    def loss(fn):
        return lambda x, w: jnp.sum(fn(x, w, *args) * cotangent)

    want_grads = jax.grad(loss(_reference), argnums=(0, 1))(lhs, rhs)
    got_grads = jax.jit(jax.grad(loss(_im2col), argnums=(0, 1)))(lhs, rhs)
    for got_grad, want_grad in zip(got_grads, want_grads):
        np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-3)


def test_kernel_gradient_equals_a_plain_loop():
    """A hand-written sum over output pixels and kernel taps, independent of XLA's convolutions."""
    rng = np.random.default_rng(7)
    lhs = rng.normal(size=(1, 5, 6, 3)).astype(np.float32)
    rhs = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
    cotangent = rng.normal(size=(1, 3, 3, 2)).astype(np.float32)  # stride 2, pad 1: 5x6 -> 3x3
    _, kernel_grad = jax.grad(lambda x, w: jnp.sum(_im2col(x, w, 2, 1, 1, 1) * cotangent), argnums=(0, 1))(
        jnp.asarray(lhs), jnp.asarray(rhs))
    padded = np.pad(lhs, ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.zeros_like(rhs)
    for y in range(3):
        for x in range(3):
            for i in range(3):
                for j in range(3):
                    want[i, j] += np.outer(padded[0, 2 * y + i, 2 * x + j], cotangent[0, y, x])
    np.testing.assert_allclose(kernel_grad, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_grad, custom", [("auto", True), ("xla", False), ("im2col", True)])
def test_conv_builder_picks_the_gradient_by_backend(weight_grad, custom):
    """On this CPU "auto" is im2col; the module's parameters and outputs are the same either way."""
    inputs = jnp.ones((1, 6, 6, 4), jnp.float32)
    module = layers.conv(5, 3, 2, kernel_init=jax.nn.initializers.normal(1.0), dtype=jnp.float32,
                         weight_grad=weight_grad)
    params = module.init(jax.random.key(0), inputs)["params"]
    jaxpr = str(jax.make_jaxpr(lambda p: module.apply({"params": p}, inputs))(params))
    assert ("custom_vjp_call" in jaxpr) == custom
    assert jax.tree.map(jnp.shape, params) == {"kernel": (3, 3, 4, 5), "bias": (5,)}


def test_unknown_weight_grad_is_named():
    module = layers.conv(5, 3, kernel_init=jax.nn.initializers.normal(1.0), dtype=jnp.float32, weight_grad="fast")
    with pytest.raises(ValueError, match="weight_grad='fast'"):
        module.init(jax.random.key(0), jnp.ones((1, 6, 6, 4)))


@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 1), (3, 2)])
def test_kernel_gradient_with_fewer_outputs_than_inputs(kernel, stride):
    """The transposed form (output gradient transposed once, ``C_out < C_in``) against XLA's gradient."""
    rng = np.random.default_rng(kernel + stride)
    lhs = jnp.asarray(rng.normal(size=(2, 9, 10, 16)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(kernel, kernel, 16, 4)), jnp.float32)
    args = (stride, kernel // 2, 1, 1)
    cotangent = jnp.asarray(rng.normal(size=_reference(lhs, rhs, *args).shape), jnp.float32)
    want = jax.grad(lambda w: jnp.sum(_reference(lhs, w, *args) * cotangent))(rhs)
    got = jax.jit(jax.grad(lambda w: jnp.sum(_im2col(lhs, w, *args) * cotangent)))(rhs)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kernel, stride, groups, ynn, custom", [
    (3, 1, 1, False, False),  # Eigen's own weight gradient
    (1, 1, 1, False, True),
    (3, 2, 1, False, True),
    (3, 1, 2, False, True),
    (3, 1, 1, True, True),    # YNNPACK's convolutions: im2col for every kernel
])
def test_auto_picks_the_faster_weight_gradient_on_cpu(monkeypatch, kernel, stride, groups, ynn, custom):
    monkeypatch.setattr(layers.xla_flags, "cpu_convolutions_on_ynn", lambda: ynn)
    inputs = jnp.ones((1, 6, 6, 4), jnp.float32)
    module = layers.conv(6, kernel, stride, groups=groups, kernel_init=jax.nn.initializers.normal(1.0),
                         dtype=jnp.float32)
    params = module.init(jax.random.key(0), inputs)["params"]
    jaxpr = str(jax.make_jaxpr(lambda p: module.apply({"params": p}, inputs))(params))
    assert ("custom_vjp_call" in jaxpr) == custom
