"""The paper's RetinaNet baseline with one anchor per location (#A = 1) and all of Table 1's improvements: GN,
GIoU, In GT Box, centre-ness and the per-level scalar (the last row of the retinanet_a1_* chain). That is ATSS
with max-IoU assignment (0.5/0.4) instead of ATSS's, the official POSITIVE_TYPE 'IoU' with REGRESSION_TYPE 'BOX':
Table 1 and Table 2 (Intersection over Union, Box) 37.0 AP, against ATSS's 39.3."""

import ml_collections

from configs import retinanet_a1_gn_giou_gtbox_ctr_r50_fpn_1x_coco


def get_config() -> ml_collections.ConfigDict:
    config = retinanet_a1_gn_giou_gtbox_ctr_r50_fpn_1x_coco.get_config()
    config.model.head.use_scales = True
    return config
