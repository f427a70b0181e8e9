"""The canvases of a config: pure Python (no TensorFlow), so the train step, the benchmarks and
serving can size the model without the input pipeline; `transforms` re-exports it."""

from __future__ import annotations

import ml_collections

from atss_jax import errors


def canvases(data_config: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
    """The canvas of each bucket: the configured one, and with buckets its transpose."""
    height, width = data_config.canvas
    if height % 32 or width % 32:
        raise errors.ConfigError(f"config.data.canvas={tuple(data_config.canvas)} must be multiples of 32.")
    if not data_config.aspect_ratio_buckets:
        return ((height, width),)
    if height == width:
        raise errors.ConfigError("config.data.aspect_ratio_buckets needs a non-square config.data.canvas.")
    return ((height, width), (width, height))
