"""ATSS ResNet-101-FPN with DCNv2 in C3-C5 and the head towers (`base.with_dcnv2`), 2x multi-scale training
(official configs/atss/atss_dcnv2_R_101_FPN_2x.yaml; the paper's Table 8: 46.3 AP on test-dev). The backbone
loads the plain network's ImageNet weights.

Recipes: "" mmdetection's (`config.recipe`), ":official" the official code's (`base.with_official_recipe`).
"""

import ml_collections

from configs import atss_r101_fpn_ms_2x_coco, base


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return base.variant(base.with_dcnv2(atss_r101_fpn_ms_2x_coco.get_config()), variant)
