"""ATSS R50-FPN 1x on COCO with the probabilistic (PAA) assigner instead of ATSS (README "Assigners").

The mmdetection recipe of configs/atss_r50_fpn_1x_coco.py, with Quality Focal Loss on the assigner's soft targets
and no centre-ness branch (`base.with_prediction_aware_assigner`).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    return base.with_prediction_aware_assigner(base.get_config(), "paa")
