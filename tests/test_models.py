"""Detector architecture: parameter count by hand, shapes per level, the head's switches, the shared layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atss_jax.models import layers
from atss_jax.models.detector import build_backbone, build_detector, build_head, full_image_sizes
from atss_jax.models.resnet import STAGE_SIZES, stage_channels
from configs import base, demo
from tests.cases import paper_grid


def _sizes(image: jax.Array) -> jax.Array:
    """[B, 2] image sizes of images that fill their canvas."""
    return full_image_sizes(image.shape[0], image.shape[1:3])


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _expected_r50_atss_parameters(num_classes: int = 80) -> tuple[int, int]:
    """Trainable parameters of ATSS R50-FPN (#A = 1), and the frozen BN affine, from the architecture.

    Backbone: convolutions only (no biases; its BN is frozen). Bottleneck i of a stage with width w
    has 1x1 (in -> w), 3x3 (w -> w), 1x1 (w -> 4w) and, first block only, a 1x1 shortcut (in -> 4w).
    FPN: 1x1 laterals and 3x3 outputs with biases, P6 and P7 3x3 convs. Head: two towers of four
    3x3 256-channel convs with biases and GroupNorm affine, the three output convs, five scales.
    """
    backbone = 7 * 7 * 3 * 64
    bn_channels = 64
    channels = 64
    for stage, blocks in enumerate(STAGE_SIZES[50]):
        width = 64 * 2**stage
        for block in range(blocks):
            backbone += channels * width + 9 * width * width + width * 4 * width
            bn_channels += width + width + 4 * width
            if block == 0:
                backbone += channels * 4 * width
                bn_channels += 4 * width
            channels = 4 * width
    conv3 = 9 * 256 * 256 + 256
    fpn = sum(c * 256 + 256 for c in (512, 1024, 2048)) + 3 * conv3 + 2 * conv3
    head = 8 * (conv3 + 2 * 256) + (9 * 256 * num_classes + num_classes) + (9 * 256 * 4 + 4) + (9 * 256 + 1) + 5
    return backbone + fpn + head, 2 * bn_channels


def test_atss_r50_parameter_count():
    config = base.get_config()
    model = build_detector(config.model, anchors_per_location=1)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 800, 1344, 3), jnp.uint8),
                                                          full_image_sizes(1, (800, 1344))))
    trainable, frozen_affine = _expected_r50_atss_parameters()
    assert trainable == 32_244_250  # + 53,120 frozen BN affine = 32,297,370: the paper's "32.3M"
    assert _count(variables["params"]) == trainable
    assert _count(variables["frozen"]) == 2 * frozen_affine  # scale, bias, mean, var


@pytest.mark.parametrize("depth", sorted(STAGE_SIZES))
def test_backbone_channels_and_strides(depth):
    image = jax.ShapeDtypeStruct((1, 96, 160, 3), jnp.float32)
    backbone_config = base.get_config().model.backbone
    backbone_config.depth = depth
    model = build_backbone(backbone_config, jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), image)
    outputs = jax.eval_shape(model.apply, variables, image)
    grid = paper_grid((96, 160))
    expected = [(1, *grid.level_shapes[i], c) for i, c in enumerate(stage_channels(depth, backbone_config.width))]
    assert [tuple(o.shape) for o in outputs] == expected


@pytest.mark.parametrize("canvas", [(96, 160), (100, 70)])
def test_every_level_matches_the_anchor_grid(canvas):
    config = demo.get_config("tiny")
    model = build_detector(config.model, anchors_per_location=1)
    grid = paper_grid(canvas)
    image = jnp.zeros((2, *canvas, 3), jnp.uint8)
    variables = model.init(jax.random.key(0), image, _sizes(image))
    features = jax.eval_shape(
        lambda v: model.fpn.apply(
            v, *model.backbone.apply({"params": variables["params"]["backbone"]}, image.astype(jnp.float32))
        ),
        {"params": variables["params"]["fpn"]},
    )
    assert [tuple(f.shape[1:3]) for f in features] == list(grid.level_shapes)
    class_logits, box_regression, centerness = model.apply(variables, image, _sizes(image))
    assert class_logits.shape == (2, grid.num_anchors, config.model.num_classes)
    assert box_regression.shape == (2, grid.num_anchors, 4) and centerness.shape == (2, grid.num_anchors)


def test_initial_class_probability_is_the_prior():
    config = demo.get_config("tiny")
    model = build_detector(config.model, anchors_per_location=1)
    image = jnp.asarray(np.random.default_rng(0).integers(0, 255, (1, 64, 64, 3)), jnp.uint8)
    variables = model.init(jax.random.key(0), image, _sizes(image))
    class_logits, _, _ = model.apply(variables, image, _sizes(image))
    np.testing.assert_allclose(jax.nn.sigmoid(class_logits).mean(), 0.01, rtol=0.2)


def test_head_switches():
    config = demo.get_config("tiny")
    with config.unlocked():
        config.model.head.use_centerness = False
        config.model.head.use_group_norm = False
        config.model.head.use_scales = False
        config.model.head.regression = "point"
    model = build_detector(config.model, anchors_per_location=1)
    image = jnp.asarray(np.random.default_rng(1).integers(0, 255, (1, 64, 64, 3)), jnp.uint8)
    variables = model.init(jax.random.key(0), image, _sizes(image))
    head = variables["params"]["head"]
    assert "centerness" not in head and not any("norm" in k or "scale" in k for k in head)
    _, box_regression, centerness = model.apply(variables, image, _sizes(image))
    assert (np.asarray(box_regression) >= 0).all() and (np.asarray(centerness) == 0).all()
    config.model.head.regression = "corners"
    with pytest.raises(ValueError, match="corners"):
        build_detector(config.model, 1).init(jax.random.key(0), image, _sizes(image))


def test_resnext_dcn_detector_places_deformable_convs_where_the_paper_does():
    """Grouped 3x3s everywhere; DCNv2 in the 3x3s of stages 2-4 and the last conv of each head tower."""
    config = demo.get_config("tiny")
    config.model.backbone.depth = 50
    config.model.backbone.width = 8
    config.model.backbone.groups = 4
    config.model.backbone.width_per_group = 16
    base.with_dcnv2(config)
    model = build_detector(config.model, anchors_per_location=1)
    image = jnp.zeros((1, 64, 96, 3), jnp.uint8)
    variables = jax.eval_shape(model.init, jax.random.key(0), image, _sizes(image))
    backbone, head = variables["params"]["backbone"], variables["params"]["head"]
    deformable = sorted(name for name, block in backbone.items() if "conv_offset" in block.get("conv2", {}))
    assert deformable == sorted(name for name in backbone if name.startswith(("layer2_", "layer3_", "layer4_")))
    # int(planes 8 * 16 / 64) * 4 groups = 8 channels, 2 per group (torchvision's formula).
    assert backbone["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 2, 8)
    last = config.model.head.num_convs - 1
    assert sorted(k for k, v in head.items() if "conv_offset" in v) == [f"box_conv{last}", f"cls_conv{last}"]
    outputs = jax.eval_shape(model.apply, variables, image, _sizes(image))
    assert outputs[0].shape == (1, paper_grid((64, 96)).num_anchors, config.model.num_classes)
    config.model.backbone.depth = 18
    with pytest.raises(ValueError, match="bottleneck"):
        jax.eval_shape(build_detector(config.model, 1).init, jax.random.key(0), image, _sizes(image))


def test_deformable_head_tower_trains_its_offsets():
    head_config = demo.get_config("tiny").model.head
    head_config.features, head_config.num_convs, head_config.deformable_tower = 8, 2, True
    head = build_head(head_config, num_classes=3, anchors_per_location=1, dtype=jnp.float32)
    rng = np.random.default_rng(3)
    levels = [jnp.asarray(rng.normal(size=(1, n, n, 8)), jnp.float32) for n in (8, 4)]
    variables = head.init(jax.random.key(0), levels)

    def loss(params):
        class_logits, boxes, centerness = head.apply({"params": params}, levels)
        return jnp.sum(class_logits**2) + jnp.sum(boxes**2) + jnp.sum(centerness**2)

    gradient = jax.jit(jax.grad(loss))(variables["params"])
    for tower in ("cls_conv1", "box_conv1"):
        assert float(jnp.abs(gradient[tower]["conv_offset"]["kernel"]).sum()) > 0


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
    config = demo.get_config("tiny")
    config.model.dtype = "bfloat16"
    model = build_detector(config.model, anchors_per_location=1)
    image = jnp.zeros((1, 64, 64, 3), jnp.uint8)
    variables = model.init(jax.random.key(0), image, _sizes(image))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
    assert all(o.dtype == jnp.float32 for o in model.apply(variables, image, _sizes(image)))


@pytest.mark.parametrize("frozen_stages", [1, 2])
def test_frozen_stages_get_no_gradient_and_are_masked(frozen_stages):
    from atss_jax.models.detector import frozen_parameter_mask

    config = demo.get_config("tiny")
    config.model.backbone.frozen_stages = frozen_stages
    model = build_detector(config.model, anchors_per_location=1)
    image = jnp.asarray(np.random.default_rng(2).integers(0, 255, (1, 64, 64, 3)), jnp.uint8)
    variables = model.init(jax.random.key(0), image, _sizes(image))
    grads = jax.grad(lambda p: sum(jnp.sum(o**2) for o in model.apply({**variables, "params": p}, image,
                                                                      _sizes(image))))(variables["params"])
    mask = frozen_parameter_mask(variables["params"], frozen_stages)
    for (path, grad), frozen in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(mask)):
        names = "/".join(str(getattr(p, "key", p)) for p in path)
        expect_frozen = names.startswith("backbone/") and (
            (frozen_stages >= 1 and names.split("/")[1] in ("conv1", "bn1"))
            or (frozen_stages >= 2 and names.split("/")[1].startswith("layer1_"))
        )
        assert frozen == expect_frozen, names
        gradient_is_zero = np.abs(np.asarray(grad)).max() == 0
        if expect_frozen:
            assert gradient_is_zero, names
        elif names.startswith("backbone/") and names.endswith("kernel"):
            assert not gradient_is_zero, names


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_conv_builder_pads_half_the_kernel_on_each_side(kernel):
    """torchvision's padding: stride 2 maps 9 x 12 to 5 x 6, and the deformable layer (zero offsets, masks of
    sigmoid(0) when fresh) samples the pixels the plain one does."""
    inputs = jnp.asarray(np.random.default_rng(kernel).normal(size=(1, 9, 12, 4)), jnp.float32)
    options = {"kernel_init": nn.initializers.normal(1.0), "bias_init": nn.initializers.normal(1.0),
               "dtype": jnp.float32, "groups": 2}
    plain = layers.conv(6, kernel, 2, **options)
    params = plain.init(jax.random.key(0), inputs)["params"]
    want = jax.lax.conv_general_dilated(
        inputs, params["kernel"], (2, 2), [(kernel // 2, kernel // 2)] * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=2, precision=jax.lax.Precision.HIGHEST) + params["bias"]
    got = plain.apply({"params": params}, inputs)
    assert got.shape == (1, 5, 6, 6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    deformable = layers.conv(6, kernel, 2, deformable=True, **options)
    offsets = deformable.init(jax.random.key(1), inputs)["params"]["conv_offset"]
    halved = deformable.apply({"params": {**params, "conv_offset": offsets}}, inputs)
    np.testing.assert_allclose(halved, 0.5 * (want - params["bias"]) + params["bias"], rtol=1e-5, atol=1e-4)


def test_norm_factory_only_trainable_bn_depends_on_train():
    x = jnp.asarray(np.random.default_rng(4).normal(2.0, 3.0, size=(4, 5, 5, 8)), jnp.float32)
    batch_norm = layers.make_norm("bn", jnp.float32)
    variables = batch_norm(False)().init(jax.random.key(0), x)
    training, updates = batch_norm(True)().apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(training.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)  # batch statistics
    np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(batch_norm(False)().apply(variables, x), x / np.sqrt(1 + 1e-5), rtol=1e-5)
    for train in (False, True):
        assert layers.make_norm("frozen_bn", jnp.float32)(train) is layers.FrozenBatchNorm
        group_norm = layers.make_norm("gn", jnp.float32)(train)()
        assert jax.tree.map(jnp.shape, group_norm.init(jax.random.key(0), x)) == {
            "params": {"norm": {"scale": (8,), "bias": (8,)}}}
    with pytest.raises(ValueError, match="frozen_bn"):
        layers.make_norm("layer_norm", jnp.float32)
