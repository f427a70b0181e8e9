"""Paper Table 1: RetinaNet (#A = 1) + GN + GIoU loss (weight 2, the official REG_LOSS_WEIGHT) instead of smooth-L1.
AP: not found here (not invented)."""

import ml_collections

from configs import base, retinanet_a1_gn_r50_fpn_1x_coco


def get_config() -> ml_collections.ConfigDict:
    config = retinanet_a1_gn_r50_fpn_1x_coco.get_config()
    config.loss.update(base.get_config().loss)  # the ATSS loss: box_loss "giou", box_loss_weight 2
    return config
