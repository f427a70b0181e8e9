"""The demo: ATSS on the synthetic shapes dataset, a small ResNet-18 from scratch, on a CPU in minutes.

Variants (``--config=configs/demo.py:tiny``, ``get_config("tiny")``):
  ""      the demo itself (README "Results").
  "tiny"  what the tests share: a smaller canvas, network and dataset that compile and run in seconds.
"""

import ml_collections

from configs import base

VARIANTS = ("", "tiny")


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/demo.py has no variant {variant!r}; it has {VARIANTS}")
    config = base.get_config()
    config.requires_accelerator = False  # sized for a CPU
    config.data.name = "synthetic_shapes"
    config.data.max_boxes = 8
    # One canvas, one compile: on a CPU a second compile costs more than the shrunken portrait images do, and
    # the synthetic shapes have no official setting to match (README "Results" were measured this way).
    config.data.aspect_ratio_buckets = False
    config.model.num_classes = 4  # the synthetic shapes
    config.model.backbone.depth = 18
    config.model.backbone.norm = "gn"
    config.model.backbone.frozen_stages = 0
    config.model.backbone.width = 16
    config.model.head.num_convs = 2
    if variant == "tiny":
        return _tiny(config)
    config.data.canvas = (160, 224)
    config.data.min_sizes = (128, 144, 160)
    config.data.max_size = 224
    config.data.eval_min_size = 160
    config.model.fpn_features = 64
    config.model.head.features = 64
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


def _tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Three steps of base.py's optimiser on 48 images at 128x160, every step logged and checkpointed."""
    config.data.canvas = (128, 160)
    config.data.min_sizes = (112, 128)
    config.data.max_size = 160
    config.data.eval_min_size = 128
    config.data.synthetic.num_train = 48
    config.data.synthetic.num_validation = 13
    config.model.fpn_features = 32
    config.model.head.features = 32
    config.train.global_batch = 8
    config.train.num_steps = 3
    config.train.log_every = 1
    config.train.checkpoint_every = 1
    config.optimizer.warmup_steps = 2
    config.eval.batch_per_device = 2
    config.eval.num_images_to_draw = 2
    return config
