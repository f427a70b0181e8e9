"""ATSS ResNeXt-101 64x4d-FPN with DCNv2 in C4-C5 (as the official X-101 configs, STAGE_WITH_DCN
(False, False, True, True)) and the head towers (`base.with_dcnv2`), 2x multi-scale training (official
configs/atss/atss_dcnv2_X_101_64x4d_FPN_2x.yaml; the paper's Table 8: 47.7 AP on test-dev). The backbone
loads the plain network's ImageNet weights.

Recipes: "" mmdetection's (`config.recipe`), ":official" the official code's (`base.with_official_recipe`).
"""

import ml_collections

from configs import atss_x101_64x4d_fpn_ms_2x_coco, base


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return base.variant(base.with_dcnv2(atss_x101_64x4d_fpn_ms_2x_coco.get_config(), stages=(3, 4)), variant)
