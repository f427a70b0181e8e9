"""ATSS R101-FPN, 2x schedule with multi-scale training (the paper's Table 8: 43.6 AP on test-dev)."""

import ml_collections

from configs import atss_r50_fpn_ms_2x_coco


def get_config() -> ml_collections.ConfigDict:
    config = atss_r50_fpn_ms_2x_coco.get_config()
    config.model.backbone.depth = 101
    return config
