"""ATSS R101-FPN, 2x schedule with multi-scale training (official configs/atss/atss_R_101_FPN_2x.yaml; the
paper's Table 8: 43.6 AP on test-dev).

Recipes: "" mmdetection's (`config.recipe`; torchvision's `resnet101` weights), ":official" the official
code's (`base.with_official_recipe`; Detectron's MSRA R-101 `.pkl`).
"""

import ml_collections

from configs import atss_r50_fpn_ms_2x_coco, atss_r101_fpn_1x_coco, base


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return base.variant(atss_r101_fpn_1x_coco.resnet101(atss_r50_fpn_ms_2x_coco.get_config()), variant)
