"""ATSS R50-FPN with DCNv2 in C3-C5 and the head towers (`base.with_dcnv2`), 1x (official
configs/atss/atss_dcnv2_R_50_FPN_1x.yaml: 43.2 AP on minival). The backbone loads the plain network's
ImageNet weights.

Recipes: "" mmdetection's (`config.recipe`), ":official" the official code's (`base.with_official_recipe`).
"""

import ml_collections

from configs import base


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return base.variant(base.with_dcnv2(base.get_config()), variant)
