"""Paper Table 1: RetinaNet (#A = 1), none of the improvements: the #A = 9 row with one square anchor of
8 strides per location. AP 32.5 (as quoted by a summary of the paper; the paper's table was not retrieved here)."""

import ml_collections

from configs import base, retinanet_a9_r50_fpn_1x_coco


def get_config() -> ml_collections.ConfigDict:
    config = retinanet_a9_r50_fpn_1x_coco.get_config()
    reference = base.get_config().anchors
    config.anchors.octave_base_scale = reference.octave_base_scale
    config.anchors.scales = reference.scales
    config.anchors.aspect_ratios = reference.aspect_ratios
    return config
