"""ATSS R50-FPN 1x on COCO (the paper's main setting, 39.3 AP on minival): the base config.

Needs ImageNet weights: `python -m scripts.convert_torchvision resnet50.pth r50.npz` (torchvision's
checkpoint), then `--config.model.backbone.pretrained=r50.npz`.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    return base.get_config()
