"""mmdetection's ATSS R-50-FPN 1x on COCO (its configs/atss/atss_r50_fpn_1x_coco.py, 39.4 AP), for its released
checkpoint imported with `python -m scripts.import_checkpoint atss_r50_fpn_1x_coco_*.pth WORKDIR --format=mmdet`.

The base config with mmdetection's switches (`atss_jax.models.mmdet_import.config_for_mmdet`): anchor centres at
`x * stride`, P7 from P6 without a ReLU, its box coder's two-sided clamp, its test-time scoring (rank by class
probability, score `prob * centerness`), RGB with torchvision's mean and std; its test_cfg and test resize
(1333, 800) are the base config's. The grid ATSS assigner trains it as any other (it reads the anchors' centre
offset).
"""

import ml_collections

from atss_jax.models import mmdet_import
from configs import base


def get_config() -> ml_collections.ConfigDict:
    return mmdet_import.config_for_mmdet(base.get_config())
