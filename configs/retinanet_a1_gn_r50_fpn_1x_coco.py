"""Paper Table 1: RetinaNet (#A = 1) + GroupNorm in the head towers. AP: not found here (not invented)."""

import ml_collections

from configs import retinanet_a1_baseline_r50_fpn_1x_coco


def get_config() -> ml_collections.ConfigDict:
    config = retinanet_a1_baseline_r50_fpn_1x_coco.get_config()
    config.model.head.use_group_norm = True
    return config
