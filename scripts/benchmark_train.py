r"""Whole train step: compile time, step time, images/s, FLOPs per image (XLA cost analysis), MFU, the
share of the step spent in assignment, and peak device memory. Prints a table and writes a JSON.

The assignment share compares the real step with the same step given a precomputed assignment of the
same shape (carried in the batch, so the assigner is not run), timed interleaved.

    python -m scripts.benchmark_train --config=configs/base.py --batch_per_device=16            # GPU / TPU
    python -m scripts.benchmark_train --config=configs/base.py --config.data.canvas=256,384 \
        --batch_per_device=2 --steps=3                                                         # this CPU
"""

import json
import time

import jax
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from atss_jax import parallel, train_step
from atss_jax.anchors import anchor_valid_mask, build_anchor_grid
from atss_jax.assigners import AssignResult, build_assigner
from scripts.benchmark_common import PEAK_TFLOPS, flops, synthetic_batch

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Experiment config.")
_BATCH = flags.DEFINE_integer("batch_per_device", 16, "Images per device.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant (after one warm-up step).")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s of one device for MFU; default by device kind.")
_OUT = flags.DEFINE_string("out", "benchmark_train.json", "JSON output.")


def _peak_tflops() -> float | None:
    if _PEAK.value:
        return _PEAK.value
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def precomputed_assignment(grid, anchor_valid, batch) -> AssignResult:
    """The assignment the batch carries (`gt_index` [B, A], `num_positives` and `iou_threshold` [B, G])."""
    del grid, anchor_valid
    return AssignResult(batch["gt_index"], batch["num_positives"], batch["iou_threshold"])


def _time_steps(step_fn, state, batch, steps: int) -> tuple[list[float], object]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times, state


def main(argv):
    del argv
    config = _CONFIG.value
    canvas = tuple(config.data.canvas)
    grid = build_anchor_grid(config.anchors, canvas)
    begin = time.perf_counter()
    training = train_step.create_training(config)
    print(f"Initialised the model in {time.perf_counter() - begin:.1f} s.", flush=True)  # progress, for timeouts
    mesh, state = training.mesh, training.state
    train_fn = train_step.compile_train_step(config, training.model, training.optimizer, mesh)
    precomputed_fn = train_step.compile_train_step(config, training.model, training.optimizer, mesh,
                                                   assign=precomputed_assignment)
    global_batch = _BATCH.value * jax.device_count()
    host = synthetic_batch(config, global_batch // jax.process_count(), np.random.default_rng(0))
    assignment = jax.jit(build_assigner(config.assigner, grid))(
        anchor_valid_mask(grid.centers, host["image_size"]), host["boxes"], host["box_valid"])
    with_assignment = {**host, **{k: np.asarray(v) for k, v in assignment._asdict().items()}}
    batch, precomputed = parallel.to_global(host, mesh), parallel.to_global(with_assignment, mesh)

    start = time.perf_counter()
    lowered = train_fn.lower(state, batch)
    flops_per_device_step = flops(lowered, lowered.compile())
    compile_seconds = time.perf_counter() - start
    counted = f"{flops_per_device_step / 1e9:.1f} GFLOPs per device" if flops_per_device_step else "FLOPs not counted"
    print(f"Compiled the step in {compile_seconds:.1f} s: {counted}.", flush=True)

    _, state = _time_steps(train_fn, state, batch, 1)
    begin = time.perf_counter()
    _, state = _time_steps(precomputed_fn, state, precomputed, 1)
    print(f"Warmed up; the step with a precomputed assignment compiled and ran in {time.perf_counter() - begin:.1f} s.",
          flush=True)
    full, without = [], []
    for _ in range(_STEPS.value):  # interleaved, so drifts hit both variants alike
        t, state = _time_steps(train_fn, state, batch, 1)
        full += t
        t, state = _time_steps(precomputed_fn, state, precomputed, 1)
        without += t
    step, step_without = float(np.median(full)), float(np.median(without))
    peak = _peak_tflops()
    achieved_tflops = flops_per_device_step / step / 1e12 if flops_per_device_step else None
    stats = jax.local_devices()[0].memory_stats() or {}
    result = {
        "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "canvas": canvas,
        "batch_per_device": _BATCH.value, "dtype": config.model.dtype, "max_boxes": config.data.max_boxes,
        "compile_seconds": compile_seconds, "step_ms": 1000 * step,
        "step_ms_precomputed_assignment": 1000 * step_without,
        "assignment_share": max(step - step_without, 0.0) / step, "images_per_second": global_batch / step,
        "gflops_per_image": flops_per_device_step / _BATCH.value / 1e9 if flops_per_device_step else None,
        "achieved_tflops_per_device": achieved_tflops, "peak_tflops": peak,
        "mfu": achieved_tflops / peak if peak and achieved_tflops else None,
        "peak_memory_gib": stats.get("peak_bytes_in_use", 0) / 2**30 if stats else None,
    }
    print(f"\nTrain step, {result['device']} x {result['devices']}, canvas {canvas}, {_BATCH.value} images/device, "
          f"{config.model.dtype}, {config.data.max_boxes} boxes/image; medians of {_STEPS.value}.")
    print("| quantity | value |\n|---|---|")
    for key, value in result.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"| {key} | {text} |")
    epath.Path(_OUT.value).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
