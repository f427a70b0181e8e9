"""Fixtures shared by several test modules."""

import ml_collections
import pytest

from atss_jax.data import synthetic
from configs import tiny


@pytest.fixture(scope="session")
def synthetic_data_config(tmp_path_factory) -> ml_collections.ConfigDict:
    """config.data of the tiny config on a small synthetic dataset, prepared once per test session."""
    config = tiny.get_config()
    config.data.name = "synthetic_shapes"
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.data.synthetic.num_train = 48
    config.data.synthetic.num_validation = 13
    synthetic.prepare(config.data.synthetic, config.data.data_dir)
    return config.data
