"""ATSS ResNeXt-101 64x4d-FPN, 2x multi-scale training (official configs/atss/atss_X_101_64x4d_FPN_2x.yaml;
the paper's Table 8: 45.6 AP on test-dev).

Recipes: "" mmdetection's (`config.recipe`; torchvision's `resnext101_64x4d` checkpoint through
`scripts/convert_torchvision.py`), ":official" the official code's (`base.with_official_recipe`; FAIR's
X-101-64x4d `.pkl`).
"""

import ml_collections

from configs import atss_r101_fpn_ms_2x_coco, base


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = atss_r101_fpn_ms_2x_coco.get_config()
    config.model.backbone.groups = 64
    config.model.backbone.width_per_group = 4
    return base.variant(config, variant)
