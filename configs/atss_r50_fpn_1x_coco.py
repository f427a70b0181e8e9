"""ATSS R50-FPN 1x on COCO (the paper's main setting, 39.3 AP on minival): the base config.

Recipes: "" the mmdetection recipe (`config.recipe`), with torchvision's ImageNet weights:
`python -m scripts.convert_torchvision resnet50.pth r50.npz`, then `--config.model.backbone.pretrained=r50.npz`.
":official" the official code's (configs/atss/atss_R_50_FPN_1x.yaml; `base.with_official_recipe`), from
Detectron's MSRA R-50 `.pkl` in `model.backbone.pretrained`.
"""

import ml_collections

from configs import base


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return base.variant(base.get_config(), variant)
