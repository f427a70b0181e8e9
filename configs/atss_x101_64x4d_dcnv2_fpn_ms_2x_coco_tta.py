"""The paper's best row (Table 8: 50.7 AP on test-dev): X-101-64x4d-DCN with multi-scale, flipped testing.

The official ``TEST.BBOX_AUG`` of configs/atss/atss_dcnv2_X_101_64x4d_FPN_2x.yaml (run with ENABLED True):
the plain 800 / 1333 view and its mirror, 12 more short sides each also mirrored (26 views; caps 1333
below 800, else 3000; the largest canvas 1824 x 3008), a per-scale object size range, and soft box voting at
IoU 0.66 keeping 1000 detections per image (the official vote path's cut, ``MODEL.ATSS.PRE_NMS_TOP_N``).
Train with `atss_x101_64x4d_dcnv2_fpn_ms_2x_coco.py` (either recipe), then evaluate its checkpoint with this
config (`--mode=eval`, the same variant).
"""

import ml_collections

from configs import atss_x101_64x4d_dcnv2_fpn_ms_2x_coco


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    config = atss_x101_64x4d_dcnv2_fpn_ms_2x_coco.get_config(variant)
    tta = config.eval.tta
    tta.enabled = True
    tta.flip = True
    tta.min_sizes = (400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800)
    tta.max_size = 3000
    tta.scale_flip = True
    tta.size_ranges = ((96, 10000), (96, 10000), (64, 10000), (64, 10000), (64, 10000), (0, 10000), (0, 10000),
                       (0, 256), (0, 256), (0, 192), (0, 192), (0, 96))
    tta.merge = "soft-vote"
    tta.vote_threshold = 0.66
    tta.soft_score_threshold = 0.05  # MODEL.RETINANET.INFERENCE_TH, which soft_bbox_vote reads
    tta.max_detections = 1000
    config.eval.batch_per_device = 2  # canvases up to 1824 x 3008
    return config
