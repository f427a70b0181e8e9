"""The ATSS detector: normalise uint8 images on device, ResNet, FPN, shared head."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from atss_jax.models.fpn import FPN
from atss_jax.models.head import ATSSHead
from atss_jax.models.resnet import ResNet
from atss_jax.models.torchvision_import import load_pretrained_backbone

# torchvision's ImageNet statistics, RGB, 0-255 scale.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


class ATSSDetector(nn.Module):
    """``image [B, H, W, 3] uint8 -> (class_logits [B, A, C], box_regression [B, A, 4],
    centerness_logits [B, A])``, anchors in ``anchors.AnchorGrid`` order for the same canvas."""

    backbone: ResNet
    fpn: FPN
    head: ATSSHead

    @nn.compact
    def __call__(self, image: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
        # Normalising here lets the host ship uint8, a quarter of float32's bytes.
        x = (image.astype(jnp.float32) - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        c3, c4, c5 = self.backbone(x, train=train)
        return self.head(self.fpn(c3, c4, c5))


def build_detector(config: ml_collections.ConfigDict, anchors_per_location: int,
                   axis_name: str | None = None) -> ATSSDetector:
    """The detector of ``config.model`` (see ``configs/base.py``); trainable BN syncs over ``axis_name``."""
    dtype = jnp.dtype(config.dtype)
    backbone = ResNet(
        depth=config.backbone.depth,
        norm=config.backbone.norm,
        frozen_stages=config.backbone.frozen_stages,
        width=config.backbone.width,
        groups=config.backbone.groups,
        width_per_group=config.backbone.width_per_group,
        deformable_stages=tuple(config.backbone.deformable_stages),
        dtype=dtype,
        axis_name=axis_name,
    )
    head = ATSSHead(
        num_classes=config.num_classes,
        anchors_per_location=anchors_per_location,
        features=config.head.features,
        num_convs=config.head.num_convs,
        regression=config.head.regression,
        use_group_norm=config.head.use_group_norm,
        use_centerness=config.head.use_centerness,
        use_scales=config.head.use_scales,
        deformable_tower=config.head.deformable_tower,
        dtype=dtype,
    )
    return ATSSDetector(backbone=backbone, fpn=FPN(config.fpn_features, dtype), head=head)


def init_detector(
    model: ATSSDetector, config: ml_collections.ConfigDict, rng: jax.Array, canvas: tuple[int, int]
) -> dict:
    """Initial variables; the backbone from ``config.backbone.pretrained`` (.npz or .pth) when set."""
    variables = jax.jit(model.init)(rng, jnp.zeros((1, *canvas, 3), jnp.uint8))
    if config.backbone.pretrained:
        variables = load_pretrained_backbone(variables, config.backbone.pretrained, config.backbone.norm)
    return variables


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
