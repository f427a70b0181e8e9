"""The synthetic demo (configs/demo.py) with each assigner, for scripts/compare_assigners.py (README "Assigners").

Variants (``--config=configs/demo_assigners.py:simota``): "tal" (the default), "simota", and "atss" (the demo
itself, the comparison's baseline). The prediction-aware ones train as ``base.with_prediction_aware_assigner``.
"""

import ml_collections

from atss_jax.assigners import PREDICTION_AWARE
from configs import base, demo

VARIANTS = ("atss", *PREDICTION_AWARE)


def get_config(variant: str = "tal") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"configs/demo_assigners.py has no variant {variant!r}; it has {VARIANTS}")
    config = demo.get_config()
    return config if variant == "atss" else base.with_prediction_aware_assigner(config, variant)
