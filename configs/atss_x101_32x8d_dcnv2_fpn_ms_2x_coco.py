"""ATSS ResNeXt-101 32x8d-FPN with DCNv2 (`base.with_dcnv2`), 2x multi-scale training (the paper's Table 8: 47.7 AP on
test-dev). The backbone loads the plain network's ImageNet weights."""

import ml_collections

from configs import atss_x101_32x8d_fpn_ms_2x_coco, base


def get_config() -> ml_collections.ConfigDict:
    return base.with_dcnv2(atss_x101_32x8d_fpn_ms_2x_coco.get_config())
