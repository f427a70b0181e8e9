"""Initial parameters of the head and of the deformable layers against the official code's rules.

The references are torch's own initialisers called as the official code calls them
(atss_core/modeling/rpn/atss/atss.py, atss_core/layers/misc.py DFConv2d,
atss_core/layers/dcn/deform_conv_module.py), compared by their range and spread.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from atss_jax.models import layers, resnet
from atss_jax.models.detector import build_head
from configs import demo

FEATURES = 64  # 9 * 64 * 64 = 36864 kernel values: spreads within a few per cent


def _torch_reference(shape: tuple[int, ...], init: str) -> np.ndarray:
    """A torch OIHW weight initialised as the official code does, transposed to flax's HWIO."""
    torch.manual_seed(0)
    weight = torch.empty(shape)
    if init == "normal_0.01":  # ATSSHead: torch.nn.init.normal_(l.weight, std=0.01)
        torch.nn.init.normal_(weight, std=0.01)
    elif init == "kaiming_uniform_a1":  # DFConv2d.offset: torch.nn.init.kaiming_uniform_(l.weight, a=1)
        torch.nn.init.kaiming_uniform_(weight, a=1)
    elif init == "dcn_reset":  # ModulatedDeformConv.reset_parameters: n = in_channels * kh * kw
        stdv = 1.0 / math.sqrt(shape[1] * shape[2] * shape[3])
        weight.uniform_(-stdv, stdv)
    return weight.numpy().transpose(2, 3, 1, 0)


def _assert_same_distribution(ours, init: str):
    ours = np.asarray(ours)
    reference = _torch_reference(tuple(ours.shape[i] for i in (3, 2, 0, 1)), init)
    assert ours.shape == reference.shape
    # Four standard errors of a sample standard deviation; a uniform's range is sharp.
    np.testing.assert_allclose(ours.std(), reference.std(), rtol=max(0.03, 4 / math.sqrt(2 * ours.size)))
    if init != "normal_0.01":
        np.testing.assert_allclose(np.abs(ours).max(), np.abs(reference).max(), rtol=0.02)
    assert abs(ours.mean()) < 4 * reference.std() / math.sqrt(ours.size)


def _head_params(regression: str, anchors_per_location: int = 1, deformable_tower: bool = True,
                 features: int = FEATURES):
    config = demo.get_config("tiny").model.head
    config.features, config.num_convs, config.deformable_tower = features, 2, deformable_tower
    config.regression = regression
    head = build_head(config, num_classes=3, anchors_per_location=anchors_per_location, dtype=jnp.float32)
    levels = [jnp.ones((1, 4, 4, features), jnp.float32)]
    # One compile for the deformable layers, whose many small ops are slow eagerly on a CPU; the rest eagerly.
    variables = (jax.jit(head.init) if deformable_tower else head.init)(jax.random.key(0), levels)
    return head, variables, levels


def test_head_convs_are_normal_001_and_the_deformable_tower_follows_dfconv2d():
    _, variables, _ = _head_params("box")
    params = variables["params"]
    for tower in ("cls", "box"):
        _assert_same_distribution(params[f"{tower}_conv0"]["kernel"], "normal_0.01")
        # The official init loop reaches DFConv2d's offset conv (a Conv2d) ...
        _assert_same_distribution(params[f"{tower}_conv1"]["conv_offset"]["kernel"], "normal_0.01")
        # ... but not its ModulatedDeformConv, which keeps U(+-1 / sqrt(9 * 64)) = U(+-1/24).
        _assert_same_distribution(params[f"{tower}_conv1"]["kernel"], "dcn_reset")
        assert np.abs(np.asarray(params[f"{tower}_conv1"]["kernel"])).max() <= 1 / 24
        for layer in (params[f"{tower}_conv0"], params[f"{tower}_conv1"], params[f"{tower}_conv1"]["conv_offset"]):
            assert not np.asarray(layer["bias"]).any()
    for name in ("bbox_pred", "centerness", "cls_logits"):
        _assert_same_distribution(params[name]["kernel"], "normal_0.01")
    np.testing.assert_allclose(params["cls_logits"]["bias"], -math.log(0.99 / 0.01), rtol=1e-6)
    assert not np.asarray(params["bbox_pred"]["bias"]).any() and not np.asarray(params["centerness"]["bias"]).any()


def test_point_regression_starts_at_four_strides():
    head, variables, levels = _head_params("point", deformable_tower=False, features=8)
    # Official REGRESSION_TYPE 'POINT': torch.nn.init.constant_(self.bbox_pred.bias, 4).
    assert (np.asarray(variables["params"]["bbox_pred"]["bias"]) == 4.0).all()
    _, boxes, _ = head.apply(variables, levels)
    np.testing.assert_allclose(boxes, 4.0, atol=0.5)  # 4 plus the small N(0, 0.01) convolutions, through scale 1
    with pytest.raises(ValueError, match="one point per location"):
        _head_params("point", anchors_per_location=9, deformable_tower=False, features=8)


def test_backbone_deformable_offsets_follow_dfconv2d():
    """DFConv2d in the official backbone: offset conv kaiming_uniform_(a=1) over all input channels (it is
    never grouped, even in a ResNeXt), zero bias; so not zero, unlike mmcv's DCNv2. One ResNeXt bottleneck
    as ResNet builds it (a whole ResNet-50 takes minutes to compile on a CPU)."""
    block = resnet.Bottleneck(
        features=64, stride=1, groups=4, width_per_group=16, deformable=True, stride_in_1x1=False,
        conv=functools.partial(layers.conv, dtype=jnp.float32, use_bias=False, kernel_init=resnet.KERNEL_INIT),
        norm=layers.FrozenBatchNorm)
    params = jax.jit(block.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 256), jnp.float32))["params"]
    offset = params["conv2"]["conv_offset"]
    assert offset["kernel"].shape == (3, 3, 64, 27) and params["conv2"]["kernel"].shape == (3, 3, 16, 64)
    _assert_same_distribution(offset["kernel"], "kaiming_uniform_a1")  # 15552 values
    assert np.abs(np.asarray(offset["kernel"])).max() <= math.sqrt(3 / (9 * 64))
    assert not np.asarray(offset["bias"]).any()
