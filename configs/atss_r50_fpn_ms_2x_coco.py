"""ATSS R50-FPN, 2x schedule with multi-scale training (short side 640-800)."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.min_sizes = (640, 672, 704, 736, 768, 800)
    config.train.num_steps = 180_000  # lr steps at 120k and 160k
    return config
