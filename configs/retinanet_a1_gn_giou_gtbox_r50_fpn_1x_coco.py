"""Paper Table 1: RetinaNet (#A = 1) + GN + GIoU + "In GT Box" (positives whose anchor centre is outside their box
are ignored, as the official POSITIVE_TYPE 'IoU'). AP: not found here (not invented)."""

import ml_collections

from configs import retinanet_a1_gn_giou_r50_fpn_1x_coco


def get_config() -> ml_collections.ConfigDict:
    config = retinanet_a1_gn_giou_r50_fpn_1x_coco.get_config()
    config.assigner.in_gt_box = True
    return config
