r"""DCNv2 against a plain 3x3 convolution at the head's size: forward and forward+backward time, FLOPs
(XLA's cost analysis), temporary memory (XLA's memory analysis) and the time ratio, interleaved,
medians. Prints a table and writes a JSON.

The default is the head's P3 level at 800x1344 (100 x 168 x 256 -> 256, batch 2 per device); the
deformable layer includes its offset/mask convolution (3 x 9 channels), as in the detector.

    python -m scripts.benchmark_dcn                                         # GPU / TPU
    python -m scripts.benchmark_dcn --height=50 --width=84 --batch=1        # this CPU, a smaller map
    python -m scripts.benchmark_dcn --height=50 --width=84 --channels=1024 --groups=32   # X-101 C4 stage
"""

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from etils import epath

from atss_jax.models.deform_conv import ModulatedDeformConv

_HEIGHT = flags.DEFINE_integer("height", 100, "Feature map height (P3 of an 800-pixel canvas).")
_WIDTH = flags.DEFINE_integer("width", 168, "Feature map width (P3 of a 1344-pixel canvas).")
_CHANNELS = flags.DEFINE_integer("channels", 256, "Input and output channels.")
_GROUPS = flags.DEFINE_integer("groups", 1, "Grouped convolution (ResNeXt-101 32x8d's C4 stage: 1024 channels, 32).")
_BATCH = flags.DEFINE_integer("batch", 2, "Images.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per variant (after one warm-up).")
_OUT = flags.DEFINE_string("out", "benchmark_dcn.json", "JSON output.")


def _layers(channels: int, groups: int, dtype) -> dict[str, nn.Module]:
    return {"conv3x3": nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=groups, dtype=dtype),
            "dcnv2": ModulatedDeformConv(channels, feature_group_count=groups, dtype=dtype)}


def main(argv) -> None:
    del argv
    dtype = jnp.dtype(_DTYPE.value)
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.normal(size=(_BATCH.value, _HEIGHT.value, _WIDTH.value, _CHANNELS.value)), jnp.float32)
    functions = {}
    for name, layer in _layers(_CHANNELS.value, _GROUPS.value, dtype).items():
        params = layer.init(jax.random.key(0), inputs)["params"]
        if name == "dcnv2":  # trained offsets: taps between pixels, as after training (not the zero init)
            offset = params["conv_offset"]
            params = {**params, "conv_offset": {**offset, "kernel": jnp.asarray(
                rng.normal(size=offset["kernel"].shape) * 0.01, jnp.float32)}}

        def forward(p, x, layer=layer):
            return layer.apply({"params": p}, x)

        def train(p, x, layer=layer):
            return jax.grad(lambda q, y: jnp.sum(layer.apply({"params": q}, y).astype(jnp.float32) ** 2),
                            argnums=(0, 1))(p, x)

        for mode, fn in (("forward", forward), ("forward+backward", train)):
            compiled = jax.jit(fn).lower(params, inputs).compile()
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            memory = compiled.memory_analysis()
            temp_mib = memory.temp_size_in_bytes / 2**20 if memory is not None else float("nan")
            functions[(name, mode)] = (compiled, params, float(cost.get("flops", 0.0)), temp_mib)
    times = {key: [] for key in functions}
    for compiled, params, _, _ in functions.values():  # warm-up
        jax.block_until_ready(compiled(params, inputs))
    for _ in range(_REPEATS.value):
        for key, (compiled, params, _, _) in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(compiled(params, inputs))
            times[key].append(time.perf_counter() - start)
    device = jax.devices()[0].device_kind
    shape = f"{_BATCH.value}x{_HEIGHT.value}x{_WIDTH.value}x{_CHANNELS.value}, groups {_GROUPS.value}"
    rows = []
    print(f"DCNv2 vs 3x3 conv, input {shape}, {_DTYPE.value}, {device}, median of {_REPEATS.value}")
    print("| pass | conv3x3 ms | dcnv2 ms | time ratio | conv3x3 GFLOPs | dcnv2 GFLOPs | conv3x3 temp MiB | "
          "dcnv2 temp MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in ("forward", "forward+backward"):
        plain, deform = (1e3 * float(np.median(times[(n, mode)])) for n in ("conv3x3", "dcnv2"))
        plain_flops, deform_flops = (functions[(n, mode)][2] / 1e9 for n in ("conv3x3", "dcnv2"))
        plain_mib, deform_mib = (functions[(n, mode)][3] for n in ("conv3x3", "dcnv2"))
        rows.append({"pass": mode, "conv3x3_ms": plain, "dcnv2_ms": deform, "ratio": deform / plain,
                     "conv3x3_gflops": plain_flops, "dcnv2_gflops": deform_flops,
                     "conv3x3_temp_mib": plain_mib, "dcnv2_temp_mib": deform_mib})
        print(f"| {mode} | {plain:.1f} | {deform:.1f} | {deform / plain:.2f}x | {plain_flops:.1f} | "
              f"{deform_flops:.1f} | {plain_mib:.0f} | {deform_mib:.0f} |")
    result = {"device": device, "input": shape, "dtype": _DTYPE.value, "rows": rows}
    epath.Path(_OUT.value).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
