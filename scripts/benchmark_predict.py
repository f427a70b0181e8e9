r"""Serving latency: the jax.export serving artifact and `Detector`, side by side, at several batch sizes.

Per path and batch: p50 and p95 latency of one call (canvas images in, detections out, host to host) and
images/s; for the artifact also compile seconds, FLOPs per image (XLA cost analysis) and MFU; the peak device
memory. Prints a table; --out writes a JSON whose top-level images_per_second, mfu, peak_memory_gib and
batch_per_device are the artifact's at the largest batch (scripts/accelerator_check.sh reads them).

    python -m scripts.benchmark_predict --out=/tmp/benchmark_predict.json               # the demo model
    python -m scripts.benchmark_predict --config=configs/base.py --out=FILE              # R50 at 800x1344
    python -m scripts.benchmark_predict --export_dir=/exports/atss_r50 --out=FILE        # an existing export
    python -m scripts.benchmark_predict --smoke --out=FILE                               # CI-sized, < 60 s

Without --export_dir it builds an export of a randomly initialised model of --config (with the artifact).
Images are synthetic canvases. No TensorFlow (the accelerator machine has none): images are not decoded
or resized, both paths start from canvases.
"""

import json
import tempfile
import time

import jax
import numpy as np
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from atss_jax import checkpoint, serving_export
from atss_jax.anchors import anchors_per_location
from atss_jax.models.detector import build_detector, init_detector
from atss_jax.serving import Detector
from scripts import benchmark_common
from scripts.benchmark_common import PEAK_TFLOPS

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Config of the randomly initialised model "
                                          "(without --export_dir).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "An existing export (with or without its serving artifact).")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Images per call (per device for Detector).")
_REPEATS = flags.DEFINE_integer("repeats", 30, "Timed calls per path and batch (after a warm-up call).")
_SMOKE = flags.DEFINE_bool("smoke", False, "A tiny fast run: configs/demo.py:tiny at 64x96, batch 2, 3 calls.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s of one device for MFU; default by device kind.")
_OUT = flags.DEFINE_string("out", None, "JSON output.")


def _peak_tflops() -> float | None:
    if _PEAK.value:
        return _PEAK.value
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), None)


def build_random_export(config, directory: str) -> None:
    """An export of a randomly initialised model of `config` (categories 1..C), with its serving artifact."""
    config.model.backbone.pretrained = ""  # random weights: nothing to download
    model = build_detector(config.model, anchors_per_location(config.anchors))
    variables = init_detector(model, config.model, jax.random.key(0), tuple(config.data.canvas))
    classes = range(1, config.model.num_classes + 1)
    checkpoint.export_inference(directory, jax.device_get(variables), config, tuple(classes),
                                tuple(f"class_{c}" for c in classes))


def _seconds(call) -> float:
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def main(argv):
    del argv
    config = _CONFIG.value
    batches, repeats = [int(b) for b in _BATCHES.value], _REPEATS.value
    if _SMOKE.value:
        from configs import demo

        config = demo.get_config("tiny")
        config.data.canvas, config.data.eval_min_size, config.data.max_size = (64, 96), 64, 96
        batches, repeats = [2], 3
    with tempfile.TemporaryDirectory(prefix="benchmark_predict_") as scratch:
        export_dir = _EXPORT_DIR.value or scratch
        if _EXPORT_DIR.value is None:
            build_random_export(config, export_dir)
        contract_path = epath.Path(export_dir) / serving_export.CONTRACT_FILE
        start = time.perf_counter()
        contract = (json.loads(contract_path.read_text()) if contract_path.exists() else
                    serving_export.export_serving(export_dir, platforms=(jax.export.default_export_platform(),)))
        export_seconds = time.perf_counter() - start
        detector = Detector(export_dir, batch_size=1)
        artifacts = {0 if a["batch"] == "any" else a["batch"]: a
                     for a in contract["artifacts"] if tuple(a["canvas"]) == detector.canvases[0]}
        rows = run_rows(detector, export_dir, artifacts, batches, repeats)
    stats = jax.local_devices()[0].memory_stats() or {}
    headline = max((r for r in rows if r["path"] == "artifact"), key=lambda r: r["batch"])
    result = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
              "local_devices": jax.local_device_count(), "canvas": list(detector.canvases[0]),
              "model": f"depth {detector.config.model.backbone.depth}, {detector.config.model.dtype}",
              "export_seconds": export_seconds, "images_per_second": headline["images_per_second"],
              "mfu": headline["mfu"], "batch_per_device": headline["batch"],
              "peak_memory_gib": stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None,
              "repeats": repeats, "rows": rows}
    print(f"\nServing latency, {result['device']} ({result['backend']}), canvas {result['canvas']}, "
          f"{result['model']}; {repeats} calls each, host arrays in and out.")
    print("| path | batch | p50 ms | p95 ms | images/s | compile s | GFLOPs/image | MFU |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['path']} | {r['batch']} | {r['p50_ms']:.2f} | {r['p95_ms']:.2f} | {r['images_per_second']:.1f} | "
              f"{r['compile_seconds']:.1f} | {_text(r['gflops_per_image'])} | {_text(r['mfu'])} |")
    if _OUT.value:
        epath.Path(_OUT.value).write_text(json.dumps(result, indent=1))


def _text(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def run_rows(detector: Detector, export_dir: str, artifacts: dict, batches: list[int], repeats: int) -> list[dict]:
    """Per batch: the artifact's row (the symbolic-batch artifact, or the fixed one of that batch) and
    Detector's (batch per device), the paths' calls interleaved so drifts hit both alike."""
    height, width = detector.canvases[0]
    rng = np.random.default_rng(0)
    peak = _peak_tflops()
    rows = []
    for batch in batches:
        artifact = artifacts.get(batch, artifacts.get(0))
        if artifact is None:
            raise app.UsageError(f"{export_dir} has no serving artifact for batch {batch} (it has "
                                 f"{sorted(artifacts)}; 0 is the symbolic batch)")
        exported = jax.export.deserialize(bytearray((epath.Path(export_dir) / artifact["file"]).read_bytes()))
        call = jax.jit(exported.call)
        images = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
        sizes = np.tile(np.array([[height, width]], np.int32), (batch, 1))
        start = time.perf_counter()
        lowered = call.lower(images, sizes)
        compiled = lowered.compile()
        compile_artifact = time.perf_counter() - start
        flops = benchmark_common.flops(lowered, compiled)
        global_images = np.concatenate([images] * jax.local_device_count())
        global_sizes = np.concatenate([sizes] * jax.local_device_count())
        paths = {"artifact": lambda c=compiled, i=images, s=sizes: jax.device_get(c(i, s)),
                 "Detector": lambda i=global_images, s=global_sizes: detector.detect_canvases(i, s)}
        compile_detector = _seconds(paths["Detector"])  # its first call compiles
        _seconds(paths["artifact"])
        times = {name: [] for name in paths}
        for _ in range(repeats):
            for name, fn in paths.items():
                times[name].append(_seconds(fn))
        for name, compile_seconds in (("artifact", compile_artifact), ("Detector", compile_detector)):
            p50, p95 = (float(np.percentile(times[name], q)) for q in (50, 95))
            images_per_call = batch * (jax.local_device_count() if name == "Detector" else 1)
            per_image = flops / batch if flops and name == "artifact" else None
            rows.append({"path": name, "batch": batch, "images_per_call": images_per_call, "p50_ms": 1000 * p50,
                         "p95_ms": 1000 * p95, "images_per_second": images_per_call / p50,
                         "compile_seconds": compile_seconds,
                         "gflops_per_image": per_image / 1e9 if per_image else None,
                         "mfu": flops / p50 / 1e12 / peak if flops and peak and name == "artifact" else None})
        print(f"batch {batch}: artifact p50 {1000 * np.median(times['artifact']):.2f} ms, Detector p50 "
              f"{1000 * np.median(times['Detector']):.2f} ms", flush=True)
    return rows


if __name__ == "__main__":
    app.run(main)
