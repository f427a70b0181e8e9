"""ATSS ResNet-101-FPN with DCNv2 (`base.with_dcnv2`), 2x multi-scale training (the paper's Table 8: 46.3 AP on
test-dev). The backbone loads the plain network's ImageNet weights."""

import ml_collections

from configs import atss_r101_fpn_ms_2x_coco, base


def get_config() -> ml_collections.ConfigDict:
    return base.with_dcnv2(atss_r101_fpn_ms_2x_coco.get_config())
