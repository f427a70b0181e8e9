"""The optimiser against the official solver: the warmup schedules against torch's schedulers, bias
rate and decay against hand-computed SGD steps and torch's SGD with per-parameter groups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from atss_jax import optim
from configs import base

torch = pytest.importorskip("torch")


def _optimizer_config(**overrides):
    config = base.get_config().optimizer
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize("method", ["linear", "constant"])
def test_schedule_matches_torch_warmup_and_multistep(method):
    """The official WarmupMultiStepLR is torch's LinearLR / ConstantLR (same factor, same number of
    iterations) chained with MultiStepLR at STEPS; the 0-based step is the scheduler's last_epoch."""
    config = _optimizer_config(warmup_method=method, warmup_steps=5, lr_milestones=(0.5, 0.75))
    schedule = optim.learning_rate_schedule(config, global_batch=16, num_steps=20)
    sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.01)
    warmup = (torch.optim.lr_scheduler.LinearLR(sgd, start_factor=1 / 3, total_iters=5) if method == "linear"
              else torch.optim.lr_scheduler.ConstantLR(sgd, factor=1 / 3, total_iters=5))
    chained = torch.optim.lr_scheduler.ChainedScheduler(
        [warmup, torch.optim.lr_scheduler.MultiStepLR(sgd, milestones=[10, 15], gamma=0.1)])
    expected = []
    for _ in range(20):
        expected.append(sgd.param_groups[0]["lr"])
        sgd.step()
        chained.step()
    np.testing.assert_allclose([float(schedule(step)) for step in range(20)], expected, rtol=1e-6)


def test_unknown_warmup_method_is_an_error():
    with pytest.raises(ValueError, match="'cosine'"):
        optim.learning_rate_schedule(_optimizer_config(warmup_method="cosine"), global_batch=16, num_steps=10)


def _run(config, params, grads, steps):
    schedule = optim.learning_rate_schedule(config, global_batch=16, num_steps=1000)
    optimizer = optim.make_optimizer(config, schedule, jax.tree.map(lambda _: False, params))
    state = optimizer.init(params)
    for _ in range(steps):
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("method", ["constant", "linear"])
def test_bias_and_kernel_steps_by_hand_over_the_warmup_boundary(method):
    """torch SGD per parameter (the official solver): d = g + wd * p; buf = m * buf + d; p -= lr * buf,
    the bias with 2 lr and wd 0. Rate 0.1, warmup 2 steps from 1/3: constant 0.1/3, 0.1/3, then 0.1;
    linear 0.1/3, 0.1 * 2/3, then 0.1. Kernel and bias start at 1 with gradient 0.5, wd 0.1, m 0.9."""
    config = _optimizer_config(base_lr=0.1, weight_decay=0.1, warmup_steps=2, warmup_method=method,
                               bias_lr_factor=2.0, bias_weight_decay_factor=0.0)
    params = {"conv": {"kernel": jnp.ones((1, 1, 1, 1)), "bias": jnp.ones(1)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    rates = [0.1 / 3, 0.1 / 3 if method == "constant" else 0.1 * 2 / 3, 0.1]
    kernel, kernel_buf, bias, bias_buf = 1.0, 0.0, 1.0, 0.0
    for steps, rate in enumerate(rates, start=1):
        kernel_buf = 0.9 * kernel_buf + 0.5 + 0.1 * kernel
        kernel -= rate * kernel_buf
        bias_buf = 0.9 * bias_buf + 0.5
        bias -= 2 * rate * bias_buf
        result = _run(config, params, grads, steps)
        np.testing.assert_allclose(float(result["conv"]["kernel"][0, 0, 0, 0]), kernel, rtol=1e-6)
        np.testing.assert_allclose(float(result["conv"]["bias"][0]), bias, rtol=1e-6)
    # Step 0 written out (the same for both methods).
    first = _run(config, params, grads, 1)
    assert float(first["conv"]["kernel"][0, 0, 0, 0]) == pytest.approx(1 - 0.1 / 3 * (0.5 + 0.1 * 1))  # 0.98
    assert float(first["conv"]["bias"][0]) == pytest.approx(1 - 2 * 0.1 / 3 * 0.5)  # 0.9667


def test_parameter_groups_match_torch_sgd():
    """Official groups: names containing "bias" (conv and GroupNorm biases) at 2x the rate without decay;
    kernels, GroupNorm weights and the head's scales at the rate with decay. Torch's SGD with those
    groups, its rate set to the schedule each step, gives the same parameters after 6 steps."""
    config = _optimizer_config(base_lr=0.05, weight_decay=0.01, warmup_steps=3, warmup_method="constant",
                               bias_lr_factor=2.0, bias_weight_decay_factor=0.0)
    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=4),
                 "conv_offset": {"kernel": rng.normal(size=(3, 3, 2, 27)), "bias": rng.normal(size=27)}},
        "norm": {"norm": {"scale": rng.normal(size=4), "bias": rng.normal(size=4)}},
        "scale0": {"scale": rng.normal(size=())},
    }
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
    params, grads = (jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t) for t in (params, grads))

    names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    torch_params = [torch.tensor(np.asarray(p), requires_grad=True) for p in jax.tree.leaves(params)]
    groups = [{"params": [p], "is_bias": "bias" in name} for name, p in zip(names, torch_params)]
    sgd = torch.optim.SGD([{"params": g["params"], "weight_decay": 0.0 if g["is_bias"] else 0.01} for g in groups],
                          lr=0.05, momentum=0.9)
    schedule = optim.learning_rate_schedule(config, global_batch=16, num_steps=1000)
    for step in range(6):
        for group, info in zip(sgd.param_groups, groups):
            group["lr"] = float(schedule(step)) * (2.0 if info["is_bias"] else 1.0)
        for p, g in zip(torch_params, jax.tree.leaves(grads)):
            p.grad = torch.tensor(np.asarray(g))
        sgd.step()

    result = _run(config, params, grads, 6)
    for name, ours, theirs in zip(names, jax.tree.leaves(result), torch_params):
        np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)


def test_bias_mask_names_only_biases():
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.ones(2)},
              "norm": {"scale": jnp.ones(2), "bias": jnp.ones(2)}, "scale0": {"scale": jnp.ones(())}}
    assert optim.bias_mask(params) == {"conv": {"kernel": False, "bias": True},
                                       "norm": {"scale": False, "bias": True}, "scale0": {"scale": False}}


def test_frozen_bias_gets_no_update():
    config = _optimizer_config(bias_lr_factor=2.0, bias_weight_decay_factor=0.0)
    params = {"backbone": {"bias": jnp.ones(2)}, "head": {"bias": jnp.ones(2)}}
    frozen = {"backbone": {"bias": True}, "head": {"bias": False}}
    optimizer = optim.make_optimizer(config, lambda step: 0.01, frozen)
    updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), optimizer.init(params), params)
    np.testing.assert_array_equal(updates["backbone"]["bias"], 0.0)
    np.testing.assert_allclose(updates["head"]["bias"], -0.02)
