"""Input pipelines: fixed-shape batches for training (deterministic, resumable) and evaluation (every image once).

Order is planned in numpy from indices, not streamed: each epoch is a seeded permutation of the split
cut into global batches, and host p of P reads rows [p*B, (p+1)*B) of every global batch (B = global
batch / P). The examples of training step s are therefore a function of (seed, s) alone, whatever the
number of hosts, threads or restarts: a run resumed at step s reads exactly what an uninterrupted run
would have read. Reading needs random access, so datasets are prepared as ArrayRecord.

Aspect-ratio buckets: with `config.data.aspect_ratio_buckets`, each image goes to the canvas of its
orientation (the configured canvas, or the same canvas transposed), and each global batch draws from
one bucket, so portrait images are not shrunk into a landscape canvas. Two canvases, two compiles.

The batch (one host's share):
    image           [B, H, W, 3] uint8   RGB, resized and zero-padded to the canvas (H, W)
    image_size      [B, 2] int32         (height, width) of the resized image inside the canvas
    original_size   [B, 2] int32         (height, width) of the original image
    scale           [B] float32          resized / original
    boxes           [B, G, 4] float32    xyxy canvas pixels of the training targets
    labels          [B, G] int32         0..C-1
    box_valid       [B, G] bool          real box: not padding, not crowd, not degenerate
    image_id        [B] int64
    example_valid   [B] bool             false for the padding examples of evaluation
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from atss_jax import errors
from atss_jax.data import coco, datasets, transforms
from atss_jax.data.splits import Split


def open_split(data_config: ml_collections.ConfigDict, split: str) -> Split:
    """The configured dataset's `split`, prepared (the synthetic demo) or opened, checked to have no image with
    more boxes than config.data.max_boxes (`Split.check_max_boxes`: at start-up, not when the image is reached)."""
    builder = datasets.get_builder(data_config)
    if split not in builder.info.splits:
        raise errors.ConfigError(f"Dataset {builder.info.full_name!r} has no split {split!r}; "
                                 f"it has {sorted(builder.info.splits)}.")
    opened = Split(builder, split)
    opened.check_max_boxes(data_config.max_boxes)
    return opened


class Categories(NamedTuple):
    """The dataset's categories in label order 0..C-1."""

    ids: tuple[int, ...]
    names: tuple[str, ...]


def categories(data_config: ml_collections.ConfigDict) -> Categories:
    """The categories of the configured dataset (opening its training split: the demo is generated)."""
    split = open_split(data_config, data_config.train_split)
    return Categories(split.category_ids, tuple(split.builder.info.features["objects"]["label"].names))


def buckets_of(split: Split, data_config: ml_collections.ConfigDict) -> np.ndarray:
    """[N] int bucket of each example: 1 where its orientation is the transpose of the canvas's."""
    if not data_config.aspect_ratio_buckets:
        return np.zeros(split.num_examples, np.int32)
    canvas_h, canvas_w = data_config.canvas
    sizes = split.image_sizes()
    image_landscape = sizes[:, 1] >= sizes[:, 0]
    return (image_landscape != (canvas_w >= canvas_h)).astype(np.int32)


def train_plan(buckets: np.ndarray, global_batch: int, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The global batches of one training epoch.

    Args:
      buckets: [N] int bucket of each example.
    Returns:
      batch_buckets: [S] int; batch_indices: [S, global_batch] int64 example indices, where
      S = sum over buckets of floor(bucket size / global_batch) (the remainder waits for the next epoch).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(buckets))
    batches, batch_buckets = [], []
    for bucket in np.unique(buckets):
        members = order[buckets[order] == bucket]
        steps = len(members) // global_batch
        batches.append(members[: steps * global_batch].reshape(steps, global_batch))
        batch_buckets.append(np.full(steps, bucket))
    if not batches or sum(len(b) for b in batches) == 0:
        raise errors.ConfigError(f"The training split has {len(buckets)} examples, fewer than one global batch "
                                 f"({global_batch}) per bucket.")
    batch_order = rng.permutation(sum(len(b) for b in batches))
    return np.concatenate(batch_buckets)[batch_order], np.concatenate(batches)[batch_order].astype(np.int64)


def eval_plan(buckets: np.ndarray, batch_size: int, process_index: int,
              process_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One host's evaluation batches: every example exactly once over all hosts, the same batch count on each.

    Each bucket's examples are split into `process_count` contiguous parts; every host pads its part to
    the longest part's batch count (padding repeats an example, marked invalid), so all hosts run the
    same number of steps with the same canvases.

    Returns:
      batch_buckets: [S] int; batch_indices: [S, batch_size] int64; batch_valid: [S, batch_size] bool.
    """
    all_buckets, all_indices, all_valid = [], [], []
    for bucket in np.unique(buckets):
        members = np.flatnonzero(buckets == bucket)
        parts = np.array_split(members, process_count)
        steps = -(-max(len(p) for p in parts) // batch_size)
        part = parts[process_index]
        valid = np.arange(steps * batch_size) < len(part)
        indices = np.where(valid, np.resize(part if len(part) else members[:1], steps * batch_size), members[0])
        all_buckets.append(np.full(steps, bucket))
        all_indices.append(indices.reshape(steps, batch_size))
        all_valid.append(valid.reshape(steps, batch_size))
    if not all_buckets:
        return np.zeros(0, np.int32), np.zeros((0, batch_size), np.int64), np.zeros((0, batch_size), bool)
    return np.concatenate(all_buckets), np.concatenate(all_indices).astype(np.int64), np.concatenate(all_valid)


def _seed_int(seed: int) -> int:
    """A well-mixed 31-bit seed, so nearby run seeds give unrelated augmentation streams."""
    return int.from_bytes(hashlib.sha256(str(seed).encode()).digest()[:4], "little") & 0x7FFFFFFF


def _example_dataset(split: Split, data_config: ml_collections.ConfigDict, elements: tf.data.Dataset, *,
                     short_sides: Sequence[int], random_flip: bool, seed: int, batch_size: int,
                     flip_all: bool = False) -> tf.data.Dataset:
    """(index, bucket, position, valid) elements -> batches of the batch dict; `flip_all` mirrors every image."""
    bucket_canvases = transforms.canvases(data_config)
    seed = _seed_int(seed)

    def load(index, bucket, position, valid):
        example = coco.decode_example(split.read(index))
        if flip_all:
            image, boxes = transforms.horizontal_flip(example["image"], example["boxes"])
            example = {**example, "image": image, "boxes": boxes}
        example_seed = tf.stack([tf.constant(seed, tf.int64), position])

        def branch(canvas):
            return lambda: transforms.preprocess(
                example, canvas=canvas, short_sides=short_sides, max_size=data_config.max_size,
                max_boxes=data_config.max_boxes, random_flip=random_flip, seed=example_seed)

        if len(bucket_canvases) == 1:
            result = branch(bucket_canvases[0])()
        else:
            result = tf.switch_case(bucket, [branch(c) for c in bucket_canvases])
        return {**result, "example_valid": valid}

    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = data_config.num_threads or 0
    return (elements.map(load, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size, drop_remainder=True)
            .prefetch(data_config.prefetch_batches)
            .with_options(options))


def _elements_signature() -> tuple[tf.TensorSpec, ...]:
    return (tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int64),
            tf.TensorSpec([], tf.bool))


def train_dataset(data_config: ml_collections.ConfigDict, *, global_batch: int, seed: int, start_step: int = 0,
                  process_index: int | None = None, process_count: int | None = None) -> tf.data.Dataset:
    """This host's training batches from step `start_step` on, forever (see the module docstring).

    Returns:
      A tf.data.Dataset of batch dicts of global_batch / process_count examples.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch % process_count:
        raise errors.ConfigError(f"The global batch {global_batch} is not divisible by {process_count} hosts.")
    batch = global_batch // process_count
    split = open_split(data_config, data_config.train_split)
    buckets = buckets_of(split, data_config)
    steps_per_epoch = len(train_plan(buckets, global_batch, seed, 0)[0])

    def elements() -> Iterator[tuple]:
        epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
        while True:
            batch_buckets, batch_indices = train_plan(buckets, global_batch, seed, epoch)
            for step in range(step_in_epoch, steps_per_epoch):
                first = (epoch * steps_per_epoch + step) * global_batch + process_index * batch
                for slot in range(batch):
                    yield (batch_indices[step, process_index * batch + slot], batch_buckets[step], first + slot, True)
            epoch, step_in_epoch = epoch + 1, 0

    ds = tf.data.Dataset.from_generator(elements, output_signature=_elements_signature())
    return _example_dataset(split, data_config, ds, short_sides=tuple(data_config.min_sizes),
                            random_flip=data_config.random_flip, seed=seed, batch_size=batch)


@dataclasses.dataclass(frozen=True)
class EvalData:
    """This host's evaluation batches (iterate `dataset` once per evaluation) and what evaluation needs."""

    dataset: tf.data.Dataset
    num_batches: int
    num_examples: int  # in the whole split, over all hosts
    category_ids: tuple[int, ...]
    split: Split


def eval_dataset(data_config: ml_collections.ConfigDict, *, batch_per_host: int, split_name: str | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 horizontal_flip: bool = False) -> EvalData:
    """The evaluation split for this host: every example once over all hosts, padded examples marked invalid.

    `horizontal_flip` mirrors every image (and box) before resizing: a test-time augmentation view.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    split = open_split(data_config, split_name or data_config.eval_split)
    batch_buckets, batch_indices, batch_valid = eval_plan(
        buckets_of(split, data_config), batch_per_host, process_index, process_count)
    elements = tf.data.Dataset.from_tensor_slices((
        batch_indices.reshape(-1), np.repeat(batch_buckets, batch_per_host).astype(np.int32),
        np.zeros(batch_indices.size, np.int64), batch_valid.reshape(-1)))
    dataset = _example_dataset(split, data_config, elements, short_sides=(data_config.eval_min_size,),
                               random_flip=False, seed=0, batch_size=batch_per_host, flip_all=horizontal_flip)
    return EvalData(dataset, len(batch_buckets), split.num_examples, split.category_ids, split)
