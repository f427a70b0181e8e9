"""What the benchmarks share without defining flags (a script importing another's module would import its
absl flags too): the devices' peak throughput, the FLOP count and the synthetic batch."""

import jax
import numpy as np

# Dense peak TFLOP/s per device in the compute dtype the configs use.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v4": 275.0}


def flops(lowered: jax.stages.Lowered, compiled: jax.stages.Compiled) -> float | None:
    """FLOPs of one call from XLA's cost analysis, or None where it cannot count them. On a GPU the compiled
    program's convolutions are cuDNN custom calls the analysis skips (3.8 GFLOPs per 800x1344 training image
    on an H200, of about 1,100), so only the lowered program's count is taken there (empty with jax 0.11.2:
    no MFU on GPUs); elsewhere the compiled program's (on a CPU the two agree to 2%)."""
    cost = (lowered if jax.default_backend() == "gpu" else compiled).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", 0.0)) or None


def synthetic_batch(config, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A full batch: random images filling the canvas, max_boxes COCO-like boxes per image."""
    height, width = config.data.canvas
    boxes_count = config.data.max_boxes
    size = np.exp(rng.uniform(np.log(8), np.log(min(height, width) * 0.8), (batch, boxes_count, 2)))
    corner = rng.uniform(0, 1, (batch, boxes_count, 2)) * (np.array([width, height]) - size)
    return {
        "image": rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8),
        "image_size": np.tile(np.array([height, width], np.int32), (batch, 1)),
        "boxes": np.concatenate([corner, corner + size], -1).astype(np.float32),
        "labels": rng.integers(0, config.model.num_classes, (batch, boxes_count)).astype(np.int32),
        "box_valid": np.ones((batch, boxes_count), bool),
    }
