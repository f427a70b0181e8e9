"""ATSS R101-FPN 1x (official configs/atss/atss_R_101_FPN_1x.yaml; the paper reports no number for it).

Recipes: "" mmdetection's (`config.recipe`; torchvision's `resnet101` weights), ":official" the official
code's (`base.with_official_recipe`; Detectron's MSRA R-101 `.pkl`).
"""

import ml_collections

from configs import base


def resnet101(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with a ResNet-101 backbone."""
    config.model.backbone.depth = 101
    return config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return base.variant(resnet101(base.get_config()), variant)
