"""`Detector`: restores an inference export (no training state) and detects objects in images.

    detector = Detector("/exports/atss_r50")
    results = detector.predict_files(["a.jpg", "b.png"])   # list of {"boxes", "scores", "category_ids", ...}

Images go through the evaluation transforms of the exported config (resize to `eval_min_size`, pad
to the canvas of their orientation), so predictions equal the trainer's evaluation. Serving needs the
model, the pre- and post-processing and the export only: no optimiser, trainer or dataset code is
imported (tested in a fresh interpreter).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
from etils import epath

from atss_jax import checkpoint, inference
from atss_jax.anchors import anchors_per_location
from atss_jax.data import transforms
from atss_jax.models.detector import abstract_variables, build_detector


class Detector:
    """An exported ATSS model ready to predict."""

    def __init__(self, export_dir: str, batch_size: int = 8):
        metadata = checkpoint.load_export_metadata(export_dir)
        self.config = ml_collections.ConfigDict(metadata["config"])
        self.category_ids = tuple(metadata["category_ids"])
        self.category_names = tuple(metadata["category_names"])
        self.batch_size = batch_size
        self.canvases = transforms.canvases(self.config.data)
        self.model = build_detector(self.config.model, anchors_per_location(self.config.anchors))
        abstract = abstract_variables(self.model, self.canvases[0])
        stored_dtype = jnp.dtype(metadata.get("parameter_dtype", "float32"))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, stored_dtype if x.dtype == jnp.float32
                                                                else x.dtype), abstract)
        variables = checkpoint.restore_inference(export_dir, abstract)
        self.variables = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == stored_dtype else x, variables)
        self._detect = jax.jit(functools.partial(inference.eval_step, config=self.config, model=self.model))

    def _preprocess(self, image: np.ndarray, canvas: tuple[int, int]) -> dict[str, np.ndarray]:
        data = self.config.data
        image = tf.convert_to_tensor(image)
        size = tf.shape(image)[:2]
        scale = transforms.resize_scale(size, tf.constant(data.eval_min_size), data.max_size, canvas)
        padded, _, image_size = transforms.resize_and_pad(image, tf.zeros([0, 4]), scale, canvas)
        return {"image": padded.numpy(), "image_size": image_size.numpy(), "scale": np.float32(scale.numpy()),
                "original_size": size.numpy()}

    def predict_arrays(self, images: Sequence[np.ndarray]) -> list[dict]:
        """Detections for [h, w, 3] uint8 RGB images.

        Returns:
          Per image: boxes [N, 4] xyxy original pixels (clipped to the image), scores [N],
          labels [N] (0..C-1), category_ids [N], category_names [N]; N <= config.eval.max_detections.
        """
        canvas_landscape = self.canvases[0][1] >= self.canvases[0][0]
        buckets = [0 if len(self.canvases) == 1 else int((im.shape[1] >= im.shape[0]) != canvas_landscape)
                   for im in images]
        results: list[dict | None] = [None] * len(images)
        for bucket, canvas in enumerate(self.canvases):
            members = [i for i, b in enumerate(buckets) if b == bucket]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                examples = [self._preprocess(images[i], canvas) for i in chunk]
                # A fixed batch size keeps one compile per canvas: pad with copies of the first image.
                padded = examples + [examples[0]] * (self.batch_size - len(examples))
                batch = {k: np.stack([e[k] for e in padded]) for k in padded[0]}
                out = jax.device_get(self._detect(self.variables, batch))
                for row, i in enumerate(chunk):
                    results[i] = self._result(out, row, batch["original_size"][row])
        return results

    def _result(self, out: dict, row: int, original_size: np.ndarray) -> dict:
        keep = out["valid"][row]
        height, width = original_size
        boxes = np.clip(out["boxes"][row][keep], 0, [width, height, width, height])
        labels = out["classes"][row][keep]
        return {"boxes": boxes, "scores": out["scores"][row][keep], "labels": labels,
                "category_ids": np.array([self.category_ids[k] for k in labels], np.int64),
                "category_names": [self.category_names[k] for k in labels]}

    def predict_files(self, paths: Sequence[str]) -> list[dict]:
        """Detections for image files (JPEG, PNG, BMP, GIF; local or in a bucket)."""
        return self.predict_arrays([transforms.decode_image(epath.Path(p).read_bytes()).numpy() for p in paths])
