"""ATSS ResNeXt-101 32x8d-FPN, 2x multi-scale training (the paper's Table 8: 45.1 AP on test-dev).

ImageNet weights: torchvision's `resnext101_32x8d` checkpoint through `scripts/convert_torchvision.py`.
"""

import ml_collections

from configs import atss_r101_fpn_ms_2x_coco


def get_config() -> ml_collections.ConfigDict:
    config = atss_r101_fpn_ms_2x_coco.get_config()
    config.model.backbone.groups = 32
    config.model.backbone.width_per_group = 8
    return config
