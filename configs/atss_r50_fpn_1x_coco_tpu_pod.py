"""ATSS R50-FPN 1x on a TPU pod slice (e.g. v4-32: 16 chips x 16 images): bfloat16 compute with float32
parameters and optimiser state, global batch 256 with the learning rate scaled linearly
(0.01 per 16 images), the same number of epochs as 90k steps at batch 16 (aspect-ratio buckets, as base.py)."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model.dtype = "bfloat16"
    config.train.global_batch = 256
    config.train.num_steps = 90_000 * 16 // 256
    config.train.checkpoint_every = 500
    config.train.log_every = 20
    config.optimizer.warmup_steps = 300
    config.eval.batch_per_device = 8
    return config
