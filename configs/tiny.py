"""Tiny config shared by the tests: a small canvas that compiles and runs in seconds on a CPU."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.canvas = (128, 160)
    config.data.max_boxes = 8
    config.model.num_classes = 3
    config.model.backbone.depth = 18
    config.model.backbone.norm = "gn"
    config.model.backbone.frozen_stages = 0
    config.model.backbone.width = 16
    config.model.fpn_features = 32
    config.model.head.features = 32
    config.model.head.num_convs = 2
    return config
