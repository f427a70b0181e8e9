r"""Input pipeline throughput on COCO-like JPEGs, split into read, decode, transform and batch.

Writes a COCO-format dataset of 640x480 JPEGs (a quarter portrait, as in COCO) with 7 boxes per image
on average, prepares it with the coco_format builder, then times, interleaved in one run:
  read       serialized example by random access + parse
  decode     + JPEG decode and box conversion
  transform  + flip, resize to the canvas, pad, box padding
  pipeline   the real training pipeline (+ batching, prefetch)
on one thread (images/s per CPU core) and on all threads. Also prints the padded-pixel fraction of
the eval canvases with and without aspect-ratio buckets.

    python -m scripts.benchmark_input [--num_images=256] [--config.data.canvas=...]
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from atss_jax.data import coco, datasets, pipeline, transforms

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Config whose data section is used.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 256, "COCO-like images to generate.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per stage (median reported).")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size of the pipeline stage.")


def write_coco_like(folder: str | epath.PathLike, count: int, seed: int = 0) -> str:
    """640x480 JPEGs with smooth textures, Poisson(7) boxes each, in ``folder`` (may be a bucket); returns the
    annotation path."""
    folder = epath.Path(folder)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id in range(1, count + 1):
        height, width = (640, 480) if rng.random() < 0.25 else (480, 640)
        coarse = rng.uniform(0, 255, (height // 32, width // 32, 3))
        pixels = np.kron(coarse, np.ones((32, 32, 1))) + rng.normal(0, 20, (height, width, 3))
        name = f"{image_id:06d}.jpg"
        (folder / name).write_bytes(tf.io.encode_jpeg(np.clip(pixels, 0, 255).astype(np.uint8), quality=90).numpy())
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        for _ in range(rng.poisson(7)):
            w, h = rng.uniform(8, width / 2), rng.uniform(8, height / 2)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return str(path)


def _stage_dataset(split: pipeline.Split, data_config, stage: str) -> tf.data.Dataset:
    def run(index):
        example = split.read(index)
        if stage == "read":
            return tf.strings.length(example["image"])
        decoded = coco.decode_example(example)
        if stage == "decode":
            return tf.shape(decoded["image"])
        out = transforms.preprocess(decoded, canvas=tuple(data_config.canvas), short_sides=tuple(data_config.min_sizes),
                                    max_size=data_config.max_size, max_boxes=data_config.max_boxes,
                                    random_flip=True, seed=tf.stack([tf.constant(0, tf.int64), index]))
        return tf.reduce_sum(tf.cast(out["image"][0, 0], tf.int32))

    return tf.data.Dataset.range(split.num_examples).map(run, num_parallel_calls=tf.data.AUTOTUNE)


def _images_per_second(dataset: tf.data.Dataset, images_per_element: int, threads: int) -> float:
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = threads
    options.autotune.enabled = True
    dataset = dataset.with_options(options)
    count, start = 0, time.perf_counter()
    for _ in dataset:
        count += images_per_element
    return count / (time.perf_counter() - start)


def main(argv):
    del argv
    data_config = _CONFIG.value.data
    with tempfile.TemporaryDirectory() as temporary:
        root = epath.Path(temporary)
        images = root / "images"
        images.mkdir()
        annotation_path = write_coco_like(images, _NUM_IMAGES.value)
        images = str(images)
        data_config.name = datasets.COCO_FORMAT
        data_config.data_dir = str(root / "tfds")
        data_config.coco_format.name = "coco_like"
        data_config.coco_format.annotations.train = annotation_path
        data_config.coco_format.images.train = images
        data_config.coco_format.annotations.validation = annotation_path
        data_config.coco_format.images.validation = images
        datasets.prepare(data_config)
        split = pipeline.open_split(data_config, "train")
        steps = split.num_examples // _BATCH.value

        def full_pipeline(threads: int) -> tf.data.Dataset:
            data_config.num_threads = threads
            return pipeline.train_dataset(data_config, global_batch=_BATCH.value, seed=0, process_index=0,
                                          process_count=1).take(steps)

        cores = os.cpu_count() or 1
        stages = ("read", "decode", "transform", "pipeline")
        results = {(stage, threads): [] for stage in stages for threads in (1, cores)}
        for _ in range(_REPEATS.value):  # interleaved, so drifts hit every stage alike
            for threads in (1, cores):
                for stage in stages:
                    dataset = full_pipeline(threads) if stage == "pipeline" else _stage_dataset(split, data_config,
                                                                                                stage)
                    per_element = _BATCH.value if stage == "pipeline" else 1
                    results[stage, threads].append(_images_per_second(dataset, per_element, threads))

        print(f"\nInput pipeline, {split.num_examples} COCO-like JPEGs (640x480, 7 boxes avg), canvas "
              f"{tuple(data_config.canvas)}, batch {_BATCH.value}, {cores} CPU cores; medians of {_REPEATS.value}.")
        print("| stage (cumulative) | images/s, 1 core | ms/image, 1 core | stage ms/image "
              f"| images/s, {cores} cores |")
        print("|---|---|---|---|---|")
        previous_ms = 0.0
        for stage in stages:
            one, many = (float(np.median(results[stage, t])) for t in (1, cores))
            ms = 1000 / one
            print(f"| {stage} | {one:.1f} | {ms:.2f} | {ms - previous_ms:+.2f} | {many:.1f} |")
            previous_ms = ms

        print("\n| canvases | padded-pixel fraction (eval) |\n|---|---|")
        for buckets in (False, True):
            data_config.aspect_ratio_buckets = buckets
            print(f"| {'two (aspect-ratio buckets)' if buckets else 'one'} | {padded_fraction(data_config):.3f} |")


def padded_fraction(data_config) -> float:
    """Fraction of canvas pixels that are padding, over the eval split."""
    data = pipeline.eval_dataset(data_config, batch_per_host=8, process_index=0, process_count=1)
    real = total = 0
    for batch in data.dataset.as_numpy_iterator():
        valid = batch["example_valid"]
        real += int(np.prod(batch["image_size"][valid].astype(np.int64), axis=1).sum())
        total += int(valid.sum()) * batch["image"].shape[1] * batch["image"].shape[2]
    return 1 - real / total


if __name__ == "__main__":
    app.run(main)
