"""Tiny config shared by the tests: a small canvas that compiles and runs in seconds on a CPU."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.canvas = (128, 160)
    config.data.max_boxes = 8
    config.model.num_classes = 4  # the synthetic shapes
    config.model.backbone.depth = 18
    config.model.backbone.norm = "gn"
    config.model.backbone.frozen_stages = 0
    config.model.backbone.width = 16
    config.model.fpn_features = 32
    config.model.head.features = 32
    config.model.head.num_convs = 2
    config.data.name = "synthetic_shapes"
    config.data.min_sizes = (112, 128)
    config.data.max_size = 160
    config.data.eval_min_size = 128
    config.data.synthetic.num_train = 48
    config.data.synthetic.num_validation = 13
    config.train.global_batch = 8
    config.train.num_steps = 3
    config.train.log_every = 1
    config.train.checkpoint_every = 1
    config.optimizer.warmup_steps = 2
    config.eval.batch_per_device = 2
    config.eval.num_images_to_draw = 2
    return config
