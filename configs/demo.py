"""The demo: ATSS on the synthetic shapes dataset, a small ResNet-18 from scratch, on a CPU in minutes."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.name = "synthetic_shapes"
    config.data.canvas = (160, 224)
    config.data.min_sizes = (128, 144, 160)
    config.data.max_size = 224
    config.data.eval_min_size = 160
    config.data.max_boxes = 8
    config.model.num_classes = 4
    config.model.backbone.depth = 18
    config.model.backbone.norm = "gn"
    config.model.backbone.frozen_stages = 0
    config.model.backbone.width = 16
    config.model.fpn_features = 64
    config.model.head.features = 64
    config.model.head.num_convs = 2
    config.train.global_batch = 16
    config.train.num_steps = 1250
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.optimizer.base_lr = 0.05
    config.optimizer.warmup_steps = 100
    config.optimizer.warmup_factor = 0.001
    config.optimizer.clip_grad_norm = 10.0
    config.eval.batch_per_device = 25
    return config
