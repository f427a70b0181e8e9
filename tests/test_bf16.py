"""bfloat16 compute (float32 parameters and optimiser state) follows the float32 loss curve."""

import jax
import numpy as np

from atss_jax import train
from tests.test_train import _config, _final_state, _scalars

STEPS = 50


def _loss_curve(data_dir, workdir, dtype):
    config = _config(data_dir)
    config.model.dtype = dtype
    config.train.num_steps = STEPS
    config.train.checkpoint_every = STEPS
    config.optimizer.warmup_steps = 10
    train.train_and_evaluate(config, str(workdir))
    losses = _scalars(str(workdir), "loss")
    return np.array([losses[s] for s in range(1, STEPS + 1)]), _final_state(config, str(workdir))


def test_bf16_follows_the_float32_loss_curve(synthetic_data_config, tmp_path):
    float32, _ = _loss_curve(synthetic_data_config.data_dir, tmp_path / "f32", "float32")
    bfloat16, state = _loss_curve(synthetic_data_config.data_dir, tmp_path / "bf16", "bfloat16")
    assert np.isfinite(bfloat16).all()
    floats = [leaf for leaf in jax.tree.leaves((state.params, state.opt_state))
              if np.issubdtype(leaf.dtype, np.floating)]
    assert floats and all(leaf.dtype == np.float32 for leaf in floats)
    assert float32[-10:].mean() < 0.8 * float32[:5].mean(), "the float32 run must learn for the check to mean much"
    np.testing.assert_allclose(bfloat16, float32, rtol=0.1)
    assert abs(bfloat16[-10:].mean() - float32[-10:].mean()) < 0.05 * float32[-10:].mean()
