"""`Detector`: restores an inference export (no training state) and detects objects in images.

    detector = Detector("/exports/atss_r50")
    results = detector.predict_files(["a.jpg", "b.png"])   # list of {"boxes", "scores", "category_ids", ...}

Images go through the evaluation transforms of the exported config (resize to `eval_min_size`, pad
to the canvas of their orientation), so predictions equal the trainer's evaluation. `detect` is the whole
function from canvas images to detections: `Detector` jits it over the local devices, and
`atss_jax.serving_export` serialises it with `jax.export` (the artifact served without this repository).
Serving needs the model, the pre- and post-processing and the export only: no optimiser, trainer or
dataset code is imported (tested in a fresh interpreter). TensorFlow is imported only to decode and resize
image files, so `detect_canvases` (the benchmarks) runs where TensorFlow is not installed.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import NamedSharding

from atss_jax import checkpoint, errors, inference, parallel, tta
from atss_jax.anchors import anchors_per_location
from atss_jax.data.canvas import canvases
from atss_jax.models.detector import abstract_variables, build_detector


def resize_geometry(original_size: jax.Array, short_side: int, max_size: int,
                    canvas: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """The evaluation resize of images of `original_size` (`transforms.resize_scale` and the size
    `transforms.resize_and_pad` resizes to, in the same float32 operations).

    Args:
      original_size: [B, 2] int32 (height, width).
      short_side, max_size: the resize (short side to `short_side`, long side at most `max_size`).
      canvas: (height, width) the resized image must fit.

    Returns:
      scale [B] float32 (resized / original), image_size [B, 2] int32 (height, width of the resized image).
    """
    size = original_size.astype(jnp.float32)
    height, width = size[:, 0], size[:, 1]
    scale = jnp.float32(short_side) / jnp.minimum(height, width)
    scale = jnp.minimum(scale, max_size / jnp.maximum(height, width))
    scale = jnp.minimum(scale, jnp.minimum(canvas[0] / height, canvas[1] / width))
    image_size = jnp.clip(jnp.round(size * scale[:, None]).astype(jnp.int32), 1, jnp.array(canvas, jnp.int32))
    return scale, image_size


def detect(variables: dict, image: jax.Array, original_size: jax.Array, *, config: ml_collections.ConfigDict,
           model: nn.Module, data_config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """Canvas images in, detections in original pixels out: normalisation, model, decoding, NMS.

    Args:
      variables: the model's variables.
      image: [B, H, W, 3] uint8, each image resized as `resize_geometry` says (bilinear) and zero-padded at the
        bottom and right to the canvas (H, W).
      original_size: [B, 2] int32 (height, width) of the images before the resize.
      config: the exported config (`anchors`, `model`, `eval`).
      model: the detector of `config.model`.
      data_config: the resize (`eval_min_size`, `max_size`): `config.data`, or a test-time augmentation view's.

    Returns:
      boxes [B, D, 4] float32 xyxy original pixels clipped to the image, scores [B, D] float32, classes [B, D]
      int32 (0..C-1), num_detections [B] int32: rows below num_detections are detections, best first; the rest
      are zeros. D = config.eval.max_detections.
    """
    scale, image_size = resize_geometry(original_size, data_config.eval_min_size, data_config.max_size,
                                        image.shape[1:3])
    out = inference.eval_step(variables, {"image": image, "image_size": image_size, "scale": scale}, config=config,
                              model=model)
    # Valid detections first, best-first order kept, so a count describes them.
    order = jnp.argsort(~out["valid"], axis=1, stable=True)
    valid = jnp.take_along_axis(out["valid"], order, axis=1)
    height, width = (original_size[:, i].astype(jnp.float32)[:, None, None] for i in (0, 1))
    boxes = jnp.take_along_axis(out["boxes"], order[..., None], axis=1)
    boxes = jnp.clip(boxes, 0.0, jnp.concatenate([width, height, width, height], axis=-1))
    return {"boxes": jnp.where(valid[..., None], boxes, 0.0),
            "scores": jnp.where(valid, jnp.take_along_axis(out["scores"], order, axis=1), 0.0),
            "classes": jnp.where(valid, jnp.take_along_axis(out["classes"], order, axis=1), 0).astype(jnp.int32),
            "num_detections": valid.sum(axis=1).astype(jnp.int32)}


def load_export(export_dir: str) -> tuple[dict, ml_collections.ConfigDict, nn.Module, dict]:
    """(metadata, config, model, float32 variables on the host) of an inference export."""
    metadata = checkpoint.load_export_metadata(export_dir)
    config = ml_collections.ConfigDict(metadata["config"])
    model = build_detector(config.model, anchors_per_location(config.anchors))
    abstract = abstract_variables(model, canvases(config.data)[0])
    stored_dtype = jnp.dtype(metadata.get("parameter_dtype", "float32"))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, stored_dtype if x.dtype == jnp.float32
                                                            else x.dtype), abstract)
    variables = checkpoint.restore_inference(export_dir, abstract)
    variables = jax.tree.map(lambda x: np.asarray(x.astype(jnp.float32) if x.dtype == stored_dtype else x),
                             variables)
    return metadata, config, model, variables


class Detector:
    """An exported ATSS model ready to predict, batching over the local devices."""

    def __init__(self, export_dir: str, batch_size: int = 8, use_tta: bool = False):
        """`batch_size` images per call (rounded up to a multiple of the local devices); `use_tta` runs the
        views of the export's `config.eval.tta` and merges them (as the evaluation does)."""
        metadata, self.config, self.model, variables = load_export(export_dir)
        self.category_ids = tuple(metadata["category_ids"])
        self.category_names = tuple(metadata["category_names"])
        self.canvases = canvases(self.config.data)
        devices = jax.local_devices()
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        self.mesh = jax.sharding.Mesh(np.array(devices), (parallel.AXIS,))
        self._batch_sharding = NamedSharding(self.mesh, parallel.BATCH_SPEC)
        self.variables = jax.device_put(variables, NamedSharding(self.mesh, parallel.REPLICATED_SPEC))
        self.use_tta = use_tta
        if use_tta:
            tta_config = ml_collections.ConfigDict(self.config.to_dict())
            tta_config.eval.tta.enabled = True
            self.views = tta.views(tta_config)
            if len(self.views) == 1:
                raise errors.ConfigError(
                    f"{export_dir}: its config.eval.tta has no flip and no min_sizes: nothing to augment")
        else:
            self.views = tta.views(self.config)[:1]
        self._detect = {}

    def _compiled(self, data_config: ml_collections.ConfigDict):
        key = (data_config.eval_min_size, data_config.max_size)
        if key not in self._detect:
            # check_vma=False as in the evaluator: NMS's while_loop carry becomes per-device.
            self._detect[key] = jax.jit(jax.shard_map(
                functools.partial(detect, config=self.config, model=self.model, data_config=data_config),
                mesh=self.mesh, in_specs=(parallel.REPLICATED_SPEC, parallel.BATCH_SPEC, parallel.BATCH_SPEC),
                out_specs=parallel.BATCH_SPEC, check_vma=False))
        return self._detect[key]

    def detect_canvases(self, image: np.ndarray, original_size: np.ndarray,
                        data_config: ml_collections.ConfigDict | None = None) -> dict[str, np.ndarray]:
        """`detect` on a batch of canvases ([B, H, W, 3] uint8, B a multiple of the local devices) and
        [B, 2] original sizes, with the resize of `data_config` (default: the export's `config.data`)."""
        fn = self._compiled(self.config.data if data_config is None else data_config)
        return jax.device_get(fn(self.variables, jax.device_put(image, self._batch_sharding),
                                 jax.device_put(original_size.astype(np.int32), self._batch_sharding)))

    def preprocess(self, image: np.ndarray, canvas: tuple[int, int],
                   data_config: ml_collections.ConfigDict | None = None) -> np.ndarray:
        """[h, w, 3] uint8 -> [canvas_h, canvas_w, 3] uint8: the evaluation resize and padding."""
        import tensorflow as tf  # decoding and resizing only: `detect_canvases` works without TensorFlow

        from atss_jax.data import transforms

        data = self.config.data if data_config is None else data_config
        image = tf.convert_to_tensor(image)
        scale = transforms.resize_scale(tf.shape(image)[:2], tf.constant(data.eval_min_size), data.max_size, canvas)
        return transforms.resize_and_pad(image, tf.zeros([0, 4]), scale, canvas)[0].numpy()

    def _predict_view(self, images: Sequence[np.ndarray], view: tta.View) -> dict[str, np.ndarray]:
        """One view's detections of `images`: boxes [N, D, 4] (original pixels, unmirrored), scores, classes,
        valid [N, D], scale [N] (the view's resize)."""
        view_canvases = canvases(view.data_config)
        canvas_landscape = view_canvases[0][1] >= view_canvases[0][0]
        buckets = [0 if len(view_canvases) == 1 else int((im.shape[1] >= im.shape[0]) != canvas_landscape)
                   for im in images]
        sizes = np.array([im.shape[:2] for im in images], np.int32).reshape(-1, 2)
        rows: list[dict | None] = [None] * len(images)
        for bucket, canvas in enumerate(view_canvases):
            members = [i for i, b in enumerate(buckets) if b == bucket]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                canvas_images = [self.preprocess(np.ascontiguousarray(images[i][:, ::-1]) if view.flip else images[i],
                                                 canvas, view.data_config) for i in chunk]
                # A fixed batch size keeps one compile per canvas: pad with copies of the first image.
                chunk_sizes = sizes[chunk + [chunk[0]] * (self.batch_size - len(chunk))]
                padded = np.stack(canvas_images + [canvas_images[0]] * (self.batch_size - len(chunk)))
                out = self.detect_canvases(padded, chunk_sizes, view.data_config)
                out["scale"] = np.asarray(resize_geometry(jnp.asarray(chunk_sizes), view.short_side, view.max_size,
                                                          canvas)[0])
                for row, i in enumerate(chunk):
                    rows[i] = {k: v[row] for k, v in out.items()}
        out = {k: np.stack([r[k] for r in rows]) for k in ("boxes", "scores", "classes", "scale")}
        out["valid"] = np.arange(out["scores"].shape[1]) < np.array([r["num_detections"] for r in rows])[:, None]
        if view.flip:
            out["boxes"] = np.where(out["valid"][..., None], tta.unflip_boxes(out["boxes"], sizes), 0.0)
        return out

    def predict_arrays(self, images: Sequence[np.ndarray]) -> list[dict]:
        """Detections for [h, w, 3] uint8 RGB images.

        Returns:
          Per image: boxes [N, 4] xyxy original pixels (clipped to the image), scores [N],
          labels [N] (0..C-1), category_ids [N], category_names [N]; N <= config.eval.max_detections
          (config.eval.tta.max_detections with test-time augmentation).
        """
        if not images:
            return []
        predictions = [self._predict_view(images, view) for view in self.views]
        if self.use_tta:
            merged = tta.merge_views([{**p, "image_id": np.arange(len(images))} for p in predictions], self.views,
                                     self.config.eval)
        else:
            merged = predictions[0]
        results = []
        for row, image in enumerate(images):
            keep = merged["valid"][row]
            height, width = image.shape[:2]
            labels = merged["classes"][row][keep]
            results.append({"boxes": np.clip(merged["boxes"][row][keep], 0, [width, height, width, height]),
                            "scores": merged["scores"][row][keep], "labels": labels,
                            "category_ids": np.array([self.category_ids[k] for k in labels], np.int64),
                            "category_names": [self.category_names[k] for k in labels]})
        return results

    def predict_files(self, paths: Sequence[str]) -> list[dict]:
        """Detections for image files (JPEG, PNG, BMP, GIF; local or in a bucket)."""
        from atss_jax.data import transforms  # TensorFlow: see the module docstring

        return self.predict_arrays([transforms.decode_image(epath.Path(p).read_bytes()).numpy() for p in paths])
