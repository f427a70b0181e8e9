"""The paper's best row (Table 8: 50.7 AP on test-dev): X-101-64x4d-DCN with multi-scale, flipped testing.

The official code's test scales, each view with its canvas and long-side cap scaled from 800 / 1333
(1800 -> 3000, the official cap), merged by class-wise NMS. Train with
`atss_x101_64x4d_dcnv2_fpn_ms_2x_coco.py`, then evaluate its checkpoint with this config
(`--mode=eval`). The official result also used box voting, which this merge does not do.
"""

import ml_collections

from configs import atss_x101_64x4d_dcnv2_fpn_ms_2x_coco


def get_config() -> ml_collections.ConfigDict:
    config = atss_x101_64x4d_dcnv2_fpn_ms_2x_coco.get_config()
    config.eval.tta.min_sizes = (400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800)
    config.eval.tta.flip = True
    config.eval.batch_per_device = 2  # up to 1800 x 3024 canvases
    return config
