"""Anchor-free ATSS (FCOS + ATSS): points regress LTRB distances; for assignment each point is a
square anchor of side 8 * stride (octave_base_scale 8, one scale and ratio). As the official
REGRESSION_TYPE 'POINT', the distances start at 4 strides (the head's box bias), i.e. at that square.
Paper: 39.2 AP (1x)."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model.head.regression = "point"
    return config
