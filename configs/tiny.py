"""Tiny config shared by the tests: a small canvas that compiles and runs in seconds on a CPU."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.canvas = (128, 160)
    config.data.max_boxes = 8
    return config
