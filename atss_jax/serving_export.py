"""The serving artifact: `serving.detect` with the exported variables inside, serialised by `jax.export`.

An inference export (`checkpoint.export_inference`) gains `serving/detect_<H>x<W>.jax` per canvas (with
aspect-ratio buckets, both orientations) and `serving.json`, the contract: inputs, outputs, the resize the
caller does, the categories. Deserialised with jax alone (no flax, no this repository) it detects:

    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    out = exported.call(image, original_size)   # uint8 [B, H, W, 3] canvases, int32 [B, 2] -> dict

The batch is symbolic (any B) unless `batch_sizes` asks for fixed ones (one file per batch size,
`detect_<H>x<W>_b<B>.jax`). The variables are constants of the serialised module (float32, whatever
the export stores). Lowered for several platforms at once, one file serves on any of them.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from etils import epath

from atss_jax import checkpoint, errors, serving, workdirs
from atss_jax.anchors import anchors_per_location
from atss_jax.data.canvas import canvases
from atss_jax.models.detector import abstract_variables, build_detector

ARTIFACT_DIR = "serving"
# What a caller installs to deserialise and run the artifact (jax.export reads the file with flatbuffers);
# serving.json records their versions at export time.
SERVING_DISTRIBUTIONS = ("jax", "jaxlib", "numpy", "ml_dtypes", "opt_einsum", "scipy", "flatbuffers")
CONTRACT_FILE = "serving.json"
DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")


def artifact_name(canvas: tuple[int, int], batch_size: int | None) -> str:
    return f"detect_{canvas[0]}x{canvas[1]}" + ("" if batch_size is None else f"_b{batch_size}") + ".jax"


def export_serving(export_dir: str, batch_sizes: Sequence[int] = (),
                   platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict:
    """Writes the serving artifact(s) and `serving.json` into an inference export; returns the contract.

    Args:
      export_dir: an inference export (its variables and config are read).
      batch_sizes: fixed batch sizes, one artifact each; empty: one artifact with a symbolic batch.
      platforms: the `jax.export` lowering platforms ("cpu", "cuda", "rocm", "tpu").
    """
    if any(b <= 0 for b in batch_sizes):
        raise errors.ConfigError(f"serving batch sizes must be positive, got {list(batch_sizes)}")
    metadata, config, model, variables = serving.load_export(export_dir)
    fn = jax.jit(functools.partial(serving.detect, variables, config=config, model=model, data_config=config.data))
    directory = epath.Path(export_dir) / ARTIFACT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for canvas in canvases(config.data):
        for batch in batch_sizes or (None,):
            (dim,) = jax.export.symbolic_shape("b") if batch is None else (batch,)
            exported = jax.export.export(fn, platforms=tuple(platforms))(
                jax.ShapeDtypeStruct((dim, *canvas, 3), np.uint8), jax.ShapeDtypeStruct((dim, 2), np.int32))
            name = artifact_name(canvas, batch)
            (directory / name).write_bytes(exported.serialize())
            files.append({"file": f"{ARTIFACT_DIR}/{name}", "canvas": list(canvas),
                          "batch": "any" if batch is None else batch})
    data = config.data
    max_detections = int(config.eval.max_detections)
    contract = {
        "format": "jax.export", "jax_version": jax.__version__, "platforms": list(platforms), "artifacts": files,
        "requires": {name: importlib.metadata.version(name) for name in SERVING_DISTRIBUTIONS},
        "dimensions": "b: the batch (any size, or the artifact's 'batch'); H, W: the artifact's canvas",
        "call": "jax.export.deserialize(bytearray(file_bytes)).call(image, original_size) -> dict of outputs",
        "inputs": [
            {"name": "image", "shape": ["b", "H", "W", 3], "dtype": "uint8",
             "meaning": "RGB images resized as 'resize' says and zero-padded at the bottom and right to the "
                        "artifact's canvas (H, W)"},
            {"name": "original_size", "shape": ["b", 2], "dtype": "int32",
             "meaning": "(height, width) of each image before the resize"}],
        "outputs": [
            {"name": "boxes", "shape": ["b", max_detections, 4], "dtype": "float32",
             "meaning": "x1, y1, x2, y2 in original pixels, clipped to the image"},
            {"name": "scores", "shape": ["b", max_detections], "dtype": "float32"},
            {"name": "classes", "shape": ["b", max_detections], "dtype": "int32",
             "meaning": "index into category_ids / category_names"},
            {"name": "num_detections", "shape": ["b"], "dtype": "int32",
             "meaning": "rows below it are detections, best first; the rest are zeros"}],
        "resize": {
            "short_side": int(data.eval_min_size), "max_size": int(data.max_size),
            "scale": "min(short_side / min(h, w), max_size / max(h, w), H / h, W / w) in float32",
            "resized_size": "round-half-even((h, w) * scale), at least 1, at most (H, W)",
            "method": "bilinear, half-pixel centres, no antialiasing (tf.image.resize; jax.image.resize with "
                      "antialias=False), then +0.5 and truncation to uint8",
            "canvas_choice": "the first canvas whose orientation (landscape: W >= H) matches the image's"
                             if len(canvases(data)) > 1 else "the one canvas"},
        "decoder": "RGB pixels as TensorFlow's tf.io.decode_image gives them (JPEG: libjpeg-turbo, its default "
                   "DCT), as training and evaluation read images; other JPEG decoders (Pillow, OpenCV) differ by "
                   "a few grey levels, which moves scores slightly",
        "category_ids": list(metadata["category_ids"]), "category_names": list(metadata["category_names"]),
    }
    (epath.Path(export_dir) / CONTRACT_FILE).write_text(json.dumps(contract, indent=1))
    return contract


def export_workdir(config: ml_collections.ConfigDict, workdir: str, export_dir: str, step: int | None = None,
                   bf16: bool = False, serving_batch_sizes: tuple[int, ...] = (),
                   serving_platforms: tuple[str, ...] = DEFAULT_PLATFORMS) -> None:
    """Exports a training workdir's checkpoint (``step``, default the latest) for inference into ``export_dir``: the
    model variables (``bf16``: stored as bfloat16), ``config`` and the categories (`checkpoint.export_inference`),
    then the serving artifact for ``serving_platforms`` (none when empty) and ``serving_batch_sizes``."""
    model = build_detector(config.model, anchors_per_location(config.anchors))
    abstract = abstract_variables(model, canvases(config.data)[0],
                                  jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    restored = checkpoint.restore_variables(workdir, abstract, step)
    category_ids, category_names = workdirs.read_categories(workdir)
    checkpoint.export_inference(export_dir, jax.device_get(restored.variables), config, category_ids, category_names,
                                parameter_dtype="bfloat16" if bf16 else "float32")
    if serving_platforms and jax.process_index() == 0:
        export_serving(export_dir, serving_batch_sizes, serving_platforms)
