"""The official ATSS checkpoint's names (every key of ATSS_R_50_FPN_1x.pth's model, written here from the official
modules: atss_core/modeling/backbone/resnet.py, backbone/fpn.py, rpn/atss/atss.py, rpn/anchor_generator.py) map
one to one onto our variables, each with exactly its tensor."""

import numpy as np
import pytest

from atss_jax.models import official_import
from atss_jax.models.layers import FrozenBatchNorm
from configs import atss_r50_fpn_1x_coco

NUM_CLASSES = 80  # the official NUM_CLASSES 81 minus the background


def official_shapes(num_classes: int, dcn: bool = False) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the official ATSS R-50-FPN's state_dict, as its modules register them (saved from
    DistributedDataParallel: ``module.``); ``dcn``: of ATSS_dcnv2_R_50_FPN_1x (``STAGE_WITH_DCN`` (False, True,
    True, True), ``USE_DCN_IN_TOWER``: those 3x3 convs are ``DFConv2d``, a ``conv`` and its ``offset`` conv)."""
    shapes = {}

    def conv(name, out, inp, k, bias=False):
        shapes[f"{name}.weight"] = (out, inp, k, k)
        if bias:
            shapes[f"{name}.bias"] = (out,)

    def frozen_bn(name, channels):  # FrozenBatchNorm2d's four buffers
        for field in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{field}"] = (channels,)

    body = "module.backbone.body"
    conv(f"{body}.stem.conv1", 64, 3, 7)
    frozen_bn(f"{body}.stem.bn1", 64)
    channels = 64
    for stage, blocks in enumerate((3, 4, 6, 3), start=1):
        planes = 64 * 2 ** (stage - 1)
        for index in range(blocks):
            block = f"{body}.layer{stage}.{index}"
            if index == 0:
                conv(f"{block}.downsample.0", 4 * planes, channels, 1)
                frozen_bn(f"{block}.downsample.1", 4 * planes)
            for j, (out, inp, k) in enumerate(((planes, channels, 1), (planes, planes, 3), (4 * planes, planes, 1)), 1):
                if dcn and j == 2 and stage > 1:  # DFConv2d(bias=False): 27 offset/mask channels for 3x3
                    conv(f"{block}.conv2.offset", 27, inp, 3, bias=True)
                    conv(f"{block}.conv2.conv", out, inp, k)
                else:
                    conv(f"{block}.conv{j}", out, inp, k)
                frozen_bn(f"{block}.bn{j}", out)
            channels = 4 * planes
    fpn = "module.backbone.fpn"
    for idx, inp in ((2, 512), (3, 1024), (4, 2048)):  # in_channels_list [0, 512, 1024, 2048], idx from 1
        conv(f"{fpn}.fpn_inner{idx}", 256, inp, 1, bias=True)
        conv(f"{fpn}.fpn_layer{idx}", 256, 256, 3, bias=True)
    conv(f"{fpn}.top_blocks.p6", 256, 256, 3, bias=True)  # USE_C5 False: from P5
    conv(f"{fpn}.top_blocks.p7", 256, 256, 3, bias=True)
    head = "module.rpn.head"
    for tower in ("cls_tower", "bbox_tower"):
        for i in range(4):  # Sequential of (Conv2d, GroupNorm, ReLU) x 4
            if dcn and i == 3:  # DFConv2d(bias=True)
                conv(f"{head}.{tower}.9.offset", 27, 256, 3, bias=True)
                conv(f"{head}.{tower}.9.conv", 256, 256, 3, bias=True)
            else:
                conv(f"{head}.{tower}.{3 * i}", 256, 256, 3, bias=True)
            shapes[f"{head}.{tower}.{3 * i + 1}.weight"] = (256,)
            shapes[f"{head}.{tower}.{3 * i + 1}.bias"] = (256,)
    conv(f"{head}.cls_logits", num_classes, 256, 3, bias=True)
    conv(f"{head}.bbox_pred", 4, 256, 3, bias=True)
    conv(f"{head}.centerness", 1, 256, 3, bias=True)
    for level in range(5):
        shapes[f"{head}.scales.{level}.scale"] = (1,)
        shapes[f"module.rpn.anchor_generator.cell_anchors.{level}"] = (1, 4)
    return shapes


def official_state_dict(num_classes: int = NUM_CLASSES, dcn: bool = False) -> dict[str, np.ndarray]:
    """Random, pairwise different tensors under every official key (variances positive, above epsilon)."""
    rng = np.random.default_rng(0)
    return {key: (rng.uniform(0.5, 1.5, shape) if key.endswith("running_var") else rng.standard_normal(shape))
            .astype(np.float32) for key, shape in official_shapes(num_classes, dcn).items()}


def _leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def _fingerprint(array: np.ndarray) -> tuple:
    """Identifies a tensor whatever its layout: its sorted values (the tensors are random, pairwise different)."""
    return (*np.sort(np.asarray(array, np.float32).reshape(-1))[:8].round(5).tolist(), array.size)


def _sources(state_dict: dict[str, np.ndarray], variables: dict) -> dict[str, str]:
    """Our variable path -> the official key whose tensor it holds (asserting it holds exactly that tensor);
    every weight of the checkpoint used once."""
    # Our variance is the official one minus epsilon (FrozenBatchNorm2d has none); find it by the official value.
    eps = np.float32(FrozenBatchNorm.epsilon)
    by_fingerprint = {_fingerprint(value): key for key, value in state_dict.items()}
    sources = {}
    for path, value in _leaves(variables):
        shift = eps if path[-1] == "var" else np.float32(0)
        key = by_fingerprint.get(_fingerprint(value + shift))
        assert key is not None, f"{'/'.join(path)} holds no tensor of the checkpoint"
        expected = state_dict[key] - shift
        if expected.ndim == 4:
            expected = expected.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        np.testing.assert_array_equal(value, expected.reshape(value.shape), err_msg="/".join(path))
        sources["/".join(path)] = key
    # One to one: every weight of the checkpoint is used once; only the anchor buffers are left.
    assert len(set(sources.values())) == len(sources)
    unused = set(state_dict) - set(sources.values())
    assert unused == {f"module.rpn.anchor_generator.cell_anchors.{level}" for level in range(5)}
    return sources


def test_every_variable_gets_exactly_its_official_tensor():
    state_dict = official_state_dict()
    sources = _sources(state_dict, official_import.convert_state_dict(
        state_dict, atss_r50_fpn_1x_coco.get_config("official")))
    # The correspondences that shapes alone would not decide.
    m = "module."
    assert sources["params/backbone/conv1/kernel"] == m + "backbone.body.stem.conv1.weight"
    assert sources["frozen/backbone/layer3_5/bn2/var"] == m + "backbone.body.layer3.5.bn2.running_var"
    assert sources["frozen/backbone/layer2_0/downsample_bn/mean"] == (
        m + "backbone.body.layer2.0.downsample.1.running_mean")
    assert sources["params/fpn/lateral3/kernel"] == m + "backbone.fpn.fpn_inner2.weight"
    assert sources["params/fpn/output5/bias"] == m + "backbone.fpn.fpn_layer4.bias"
    assert sources["params/fpn/p6/kernel"] == m + "backbone.fpn.top_blocks.p6.weight"
    assert sources["params/fpn/p7/kernel"] == m + "backbone.fpn.top_blocks.p7.weight"
    assert sources["params/head/cls_conv2/kernel"] == m + "rpn.head.cls_tower.6.weight"
    assert sources["params/head/box_norm3/norm/scale"] == m + "rpn.head.bbox_tower.10.weight"
    assert sources["params/head/box_conv0/bias"] == m + "rpn.head.bbox_tower.0.bias"
    assert sources["params/head/centerness/kernel"] == m + "rpn.head.centerness.weight"
    assert sources["params/head/scale4/scale"] == m + "rpn.head.scales.4.scale"


def test_missing_unused_and_misshaped_keys_are_named():
    state_dict = official_state_dict(num_classes=3)
    state_dict.pop("module.rpn.head.scales.2.scale")
    state_dict["module.rpn.head.extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(ValueError) as error:
        official_import.convert_state_dict(state_dict, atss_r50_fpn_1x_coco.get_config("official"))
    message = str(error.value)
    assert "missing rpn.head.scales.2.scale" in message
    assert "unused rpn.head.extra.weight" in message
    assert "rpn.head.cls_logits.weight: shape (3, 256, 3, 3)" in message


def test_dcn_model_maps_its_deformable_convs_and_offsets():
    from configs import atss_r50_dcnv2_fpn_1x_coco

    state_dict = official_state_dict(dcn=True)
    sources = _sources(state_dict, official_import.convert_state_dict(
        state_dict, atss_r50_dcnv2_fpn_1x_coco.get_config("official")))
    m = "module."
    assert sources["params/backbone/layer1_0/conv2/kernel"] == m + "backbone.body.layer1.0.conv2.weight"  # no DCN
    assert sources["params/backbone/layer3_2/conv2/kernel"] == m + "backbone.body.layer3.2.conv2.conv.weight"
    assert sources["params/backbone/layer3_2/conv2/conv_offset/kernel"] == (
        m + "backbone.body.layer3.2.conv2.offset.weight")
    assert sources["params/backbone/layer4_0/conv2/conv_offset/bias"] == m + "backbone.body.layer4.0.conv2.offset.bias"
    assert sources["params/head/cls_conv3/kernel"] == m + "rpn.head.cls_tower.9.conv.weight"
    assert sources["params/head/box_conv3/bias"] == m + "rpn.head.bbox_tower.9.conv.bias"
    assert sources["params/head/box_conv3/conv_offset/kernel"] == m + "rpn.head.bbox_tower.9.offset.weight"
    assert sources["params/head/cls_conv2/kernel"] == m + "rpn.head.cls_tower.6.weight"


def test_dcn_checkpoint_and_plain_config_do_not_mix():
    from configs import atss_r50_dcnv2_fpn_1x_coco

    with pytest.raises(ValueError, match=r"has deformable convolutions .* but the config none: use .*dcnv2"):
        official_import.convert_state_dict(official_state_dict(dcn=True), atss_r50_fpn_1x_coco.get_config("official"))
    with pytest.raises(ValueError, match="config has deformable convolutions but the checkpoint none"):
        official_import.convert_state_dict(official_state_dict(), atss_r50_dcnv2_fpn_1x_coco.get_config("official"))
