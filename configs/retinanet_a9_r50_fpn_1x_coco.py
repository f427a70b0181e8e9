"""Paper Table 1, first row: the original RetinaNet (#A = 9) in this codebase's R-50-FPN 1x setting.

Nine anchors per location (3 octave scales x 3 aspect ratios, base 4 strides), max-IoU assignment (0.5/0.4, with
low-quality matches, no "In GT Box"), smooth-L1 on (10, 10, 5, 5) deltas with maskrcnn-benchmark's RetinaNet
settings (BBOX_REG_BETA 0.11, the sum over the four deltas divided by 4 positives per anchor: weight 0.25), no
GroupNorm, centre-ness or scales in the head. The rows below add the paper's improvements one at a time
(retinanet_a1_*). AP: not found here (the paper's Table 1 value could not be retrieved; not invented).

Differences from the original RetinaNet that stay: the ATSS inference settings (NMS 0.6, not 0.4), P6 from P5 (not
C5) and the classification normaliser (positives, not positives + images).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.anchors.octave_base_scale = 4.0
    config.anchors.scales = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    config.anchors.aspect_ratios = (0.5, 1.0, 2.0)
    config.assigner.name = "max_iou"
    config.assigner.in_gt_box = False
    config.model.head.use_group_norm = False
    config.model.head.use_centerness = False
    config.model.head.use_scales = False
    config.loss.box_loss = "smooth_l1"
    config.loss.box_loss_weight = 0.25
    config.loss.smooth_l1_beta = 0.11
    return config
