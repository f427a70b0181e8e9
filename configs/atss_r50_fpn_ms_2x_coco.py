"""ATSS R50-FPN, 2x schedule with multi-scale training: every integer short side 640..800 equally likely,
as the official MIN_SIZE_RANGE_TRAIN (640, 800). No official config or paper number: R-50 at the 2x recipe.

Recipes: "" mmdetection's (`config.recipe`), ":official" the official code's (`base.with_official_recipe`).
"""

import ml_collections

from configs import base


def multi_scale_2x(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with the official 2x configs' training: short side drawn from 640..800, 180k steps."""
    config.data.min_sizes = tuple(range(640, 801))
    config.train.num_steps = 180_000  # lr steps at 120k and 160k
    return config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    return base.variant(multi_scale_2x(base.get_config()), variant)
