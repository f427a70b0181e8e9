"""Paper Table 1: RetinaNet (#A = 1) + GN + GIoU + In GT Box + centre-ness. AP: not found here (not invented)."""

import ml_collections

from configs import retinanet_a1_gn_giou_gtbox_r50_fpn_1x_coco


def get_config() -> ml_collections.ConfigDict:
    config = retinanet_a1_gn_giou_gtbox_r50_fpn_1x_coco.get_config()
    config.model.head.use_centerness = True
    return config
