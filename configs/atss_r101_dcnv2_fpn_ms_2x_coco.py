"""ATSS ResNet-101-FPN with DCNv2, 2x multi-scale training (the paper's Table 8: 46.3 AP on test-dev).

Modulated deformable convolutions in the 3x3 convolutions of stages 2-4 (C3-C5) and in the last conv of
each head tower, as the official `dcnv2` configs; the backbone loads the plain network's ImageNet weights.
"""

import ml_collections

from configs import atss_r101_fpn_ms_2x_coco


def get_config() -> ml_collections.ConfigDict:
    config = atss_r101_fpn_ms_2x_coco.get_config()
    config.model.backbone.deformable_stages = (2, 3, 4)
    config.model.head.deformable_tower = True
    return config
