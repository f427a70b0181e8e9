"""The paper's FCOS baseline: points with FCOS's spatial (inside the box) and scale (regress ranges)
constraints, with everything else as ATSS (paper Table 1: 37.8 AP with the same improvements)."""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.model.head.regression = "point"
    config.assigner.name = "fcos"
    return config
