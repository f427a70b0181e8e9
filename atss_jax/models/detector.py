"""The ATSS detector: normalise uint8 images on device, ResNet, FPN, shared head."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from atss_jax import errors
from atss_jax.models import layers
from atss_jax.models.fpn import FPN
from atss_jax.models.head import ATSSHead
from atss_jax.models.resnet import ResNet
from atss_jax.models.torchvision_import import load_pretrained_backbone

INPUT_CHANNELS = ("rgb", "bgr")


class ATSSDetector(nn.Module):
    """``(image [B, H, W, 3] uint8 RGB, image_size [B, 2] int) -> (class_logits [B, A, C],
    box_regression [B, A, 4], centerness_logits [B, A])``, anchors in ``anchors.AnchorGrid`` order for
    the same canvas. ``image_size`` is the (height, width) of the resized image inside the canvas.

    Attributes:
      input_channels: channel order the backbone takes ("rgb" or "bgr", the order its weights were
        trained with).
      pixel_mean, pixel_std: per channel, in ``input_channels`` order, 0-255 scale.
    """

    backbone: ResNet
    fpn: FPN
    head: ATSSHead
    input_channels: str
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]

    @nn.compact
    def __call__(self, image: jax.Array, image_size: jax.Array,
                 train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        # Normalising here lets the host ship uint8, a quarter of float32's bytes.
        x = normalise(image, image_size, self.input_channels, self.pixel_mean, self.pixel_std)
        c3, c4, c5 = self.backbone(x, train=train)
        return self.head(self.fpn(c3, c4, c5))


def normalise(image: jax.Array, image_size: jax.Array, input_channels: str, pixel_mean: tuple[float, ...],
              pixel_std: tuple[float, ...]) -> jax.Array:
    """``image [B, H, W, 3] uint8 RGB`` -> ``[B, H, W, 3] float32``: channels in ``input_channels`` order,
    ``(x - pixel_mean) / pixel_std``, and zero outside each image's ``image_size [B, 2]`` (height, width).

    The host pads with black before normalising; the official code (maskrcnn-benchmark's
    ``to_image_list``) and mmdetection pad the normalised image with zeros, so the padding is reset here.
    """
    x = image.astype(jnp.float32)
    if input_channels == "bgr":
        x = x[..., ::-1]
    x = (x - jnp.asarray(pixel_mean, jnp.float32)) / jnp.asarray(pixel_std, jnp.float32)
    rows = jnp.arange(image.shape[1])[None, :, None] < image_size[:, 0, None, None]
    columns = jnp.arange(image.shape[2])[None, None, :] < image_size[:, 1, None, None]
    return jnp.where((rows & columns)[..., None], x, 0.0)


def full_image_sizes(batch: int, canvas: tuple[int, int]) -> jax.Array:
    """``[batch, 2] int32``: every image fills the ``canvas`` (for initialisation and shape checks)."""
    return jnp.tile(jnp.asarray([canvas], jnp.int32), (batch, 1))


def build_backbone(backbone_config: ml_collections.ConfigDict, dtype: jnp.dtype,
                   axis_name: str | None = None) -> ResNet:
    """The ResNet of ``backbone_config`` (``config.model.backbone``); trainable BN syncs over ``axis_name``."""
    return ResNet(
        depth=backbone_config.depth,
        frozen_stages=backbone_config.frozen_stages,
        width=backbone_config.width,
        groups=backbone_config.groups,
        width_per_group=backbone_config.width_per_group,
        stride_in_1x1=backbone_config.stride_in_1x1,
        deformable_stages=tuple(backbone_config.deformable_stages),
        conv=functools.partial(layers.conv, dtype=dtype),
        norm=layers.make_norm(backbone_config.norm, dtype, axis_name),
    )


def build_fpn(features: int, dtype: jnp.dtype, relu_before_p7: bool = True) -> FPN:
    """The FPN of ``features`` (``config.model.fpn_features``) channels; ``relu_before_p7``:
    ``config.model.fpn_relu_before_p7``."""
    return FPN(features=features, conv=functools.partial(layers.conv, dtype=dtype), relu_before_p7=relu_before_p7)


def build_head(head_config: ml_collections.ConfigDict, num_classes: int, anchors_per_location: int,
               dtype: jnp.dtype) -> ATSSHead:
    """The head of ``head_config`` (``config.model.head``); GroupNorm in the towers if it asks for it."""
    return ATSSHead(
        num_classes=num_classes,
        anchors_per_location=anchors_per_location,
        features=head_config.features,
        num_convs=head_config.num_convs,
        regression=head_config.regression,
        use_centerness=head_config.use_centerness,
        use_scales=head_config.use_scales,
        deformable_tower=head_config.deformable_tower,
        prior_prob=head_config.prior_prob,
        conv=functools.partial(layers.conv, dtype=dtype),
        norm=functools.partial(layers.GroupNorm, dtype=dtype) if head_config.use_group_norm else None,
    )


def build_detector(config: ml_collections.ConfigDict, anchors_per_location: int,
                   axis_name: str | None = None) -> ATSSDetector:
    """The detector of ``config.model`` (see ``configs/base.py``); trainable BN syncs over ``axis_name``.

    Raises:
      ValueError: ``input_channels`` is not one of ``INPUT_CHANNELS``, or ``pixel_mean``/``pixel_std`` do not
        hold three numbers (``pixel_std`` positive).
    """
    if config.input_channels not in INPUT_CHANNELS:
        raise errors.ConfigError(
            f"config.model.input_channels={config.input_channels!r} is not one of {INPUT_CHANNELS}.")
    for name in ("pixel_mean", "pixel_std"):
        value = config[name]
        if len(value) != 3:
            raise errors.ConfigError(f"config.model.{name}={tuple(value)} must hold one number per channel (3), in "
                                     f"config.model.input_channels={config.input_channels!r} order.")
    if min(config.pixel_std) <= 0:
        raise errors.ConfigError(f"config.model.pixel_std={tuple(config.pixel_std)} must be positive.")
    dtype = jnp.dtype(config.dtype)
    return ATSSDetector(
        backbone=build_backbone(config.backbone, dtype, axis_name),
        fpn=build_fpn(config.fpn_features, dtype, config.fpn_relu_before_p7),
        head=build_head(config.head, config.num_classes, anchors_per_location, dtype),
        input_channels=config.input_channels,
        pixel_mean=tuple(float(v) for v in config.pixel_mean),
        pixel_std=tuple(float(v) for v in config.pixel_std),
    )


def init_detector(
    model: ATSSDetector, config: ml_collections.ConfigDict, rng: jax.Array, canvas: tuple[int, int]
) -> dict:
    """Initial variables; the backbone from ``config.backbone.pretrained`` (.npz or .pth) when set."""
    variables = jax.jit(model.init)(rng, jnp.zeros((1, *canvas, 3), jnp.uint8), full_image_sizes(1, canvas))
    if config.backbone.pretrained:
        variables = load_pretrained_backbone(variables, config.backbone.pretrained, config.backbone.norm)
    return variables


def abstract_variables(model: ATSSDetector, canvas: tuple[int, int],
                       sharding: jax.sharding.Sharding | None = None) -> dict:
    """The model's variables as ``jax.ShapeDtypeStruct`` leaves (placed with ``sharding``): what a restore
    fills, computed without initialising anything or loading pretrained weights."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *canvas, 3), jnp.uint8),
                            full_image_sizes(1, canvas))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def frozen_parameter_mask(params: dict, frozen_stages: int) -> dict:
    """``params``-shaped pytree of bools: True for the backbone parameters ``frozen_stages`` freezes.

    The model stops their gradients; the optimiser must also leave them alone (no weight decay), e.g.
    ``optax.multi_transform({"train": sgd, "frozen": optax.set_to_zero()}, labels)``.
    """
    frozen_prefixes = (("conv1", "bn1") if frozen_stages >= 1 else ()) + tuple(
        f"layer{stage}_" for stage in range(1, frozen_stages)
    )

    def is_frozen(path: tuple, _: jax.Array) -> bool:
        names = [getattr(entry, "key", None) for entry in path]
        return (
            len(names) > 1 and names[0] == "backbone" and str(names[1]).startswith(frozen_prefixes)
            if frozen_prefixes
            else False
        )

    return jax.tree_util.tree_map_with_path(is_frozen, params)
