"""Per-example transforms in pure TensorFlow (they run inside tf.data's parallel map, and in serving).

Decoding and the canvases of a config (`canvas.canvases`, re-exported) live here too, so that serving
needs no dataset code. Input is `coco.decode_example`'s output (original pixels); output is one example
of the batch dict with static shapes: the image resized keeping its aspect ratio and zero-padded to a
fixed canvas, boxes in canvas pixels padded to `max_boxes` with a valid mask. Randomness is stateless,
keyed by a per-example seed, so an example's augmentation does not depend on threads or on resumption.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from atss_jax.data.canvas import canvases as canvases  # re-exported: the pipeline, evaluation and serving use it


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/BMP bytes -> [h, w, 3] uint8 RGB (grayscale and RGBA converted)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def training_targets_mask(boxes: tf.Tensor, is_crowd: tf.Tensor, image_size: tf.Tensor) -> tf.Tensor:
    """Boxes that are training targets: not crowd, non-zero width and height after clipping.

    Args:
      boxes: [n, 4] float32 xyxy pixels; is_crowd: [n] bool; image_size: [2] (height, width).
    Returns:
      [n] bool.
    """
    clipped = clip_boxes(boxes, image_size)
    nonempty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    return nonempty & ~is_crowd


def clip_boxes(boxes: tf.Tensor, image_size: tf.Tensor) -> tf.Tensor:
    """[n, 4] xyxy boxes clipped to an image of size (height, width)."""
    height, width = tf.unstack(tf.cast(image_size, boxes.dtype))
    return tf.clip_by_value(boxes, 0.0, tf.stack([width, height, width, height]))


def horizontal_flip(image: tf.Tensor, boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mirrors image [h, w, 3] and boxes [n, 4] xyxy pixels about the vertical centre line."""
    width = tf.cast(tf.shape(image)[1], boxes.dtype)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=1)
    return image[:, ::-1], tf.stack([width - x2, y1, width - x1, y2], axis=1)


def resize_scale(image_size: tf.Tensor, short_side: tf.Tensor, max_size: float,
                 canvas: Sequence[int]) -> tf.Tensor:
    """The aspect-preserving scale: short side to `short_side`, long side at most `max_size`, inside `canvas`.

    Args:
      image_size: [2] (height, width) of the original image.
      short_side: [] target of the shorter side.
      max_size: largest allowed longer side.
      canvas: (height, width) the resized image must fit (portrait images in a landscape canvas end
        smaller than `short_side`; aspect-ratio buckets avoid that).
    Returns:
      [] float32 scale (resized / original).
    """
    height, width = tf.unstack(tf.cast(image_size, tf.float32))
    scale = tf.cast(short_side, tf.float32) / tf.minimum(height, width)
    scale = tf.minimum(scale, max_size / tf.maximum(height, width))
    return tf.minimum(scale, tf.minimum(canvas[0] / height, canvas[1] / width))


def resize_and_pad(image: tf.Tensor, boxes: tf.Tensor, scale: tf.Tensor,
                   canvas: Sequence[int]) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Resizes by `scale` (bilinear), zero-pads to `canvas` (top-left aligned), scales the boxes.

    Returns:
      image: [canvas_h, canvas_w, 3] uint8; boxes: [n, 4] float32 canvas pixels;
      image_size: [2] int32 (height, width) of the resized image inside the canvas.
    """
    original = tf.cast(tf.shape(image)[:2], tf.float32)
    resized_size = tf.cast(tf.round(original * scale), tf.int32)
    resized_size = tf.clip_by_value(resized_size, 1, tf.constant(canvas, tf.int32))
    resized = tf.image.resize(image, resized_size, method="bilinear")
    # Bilinear weights are convex, so values stay in [0, 255]: +0.5 and truncation round without a clip.
    resized = tf.cast(resized + 0.5, tf.uint8)
    padded = tf.image.pad_to_bounding_box(resized, 0, 0, canvas[0], canvas[1])
    return padded, boxes * scale, resized_size


def pad_boxes(boxes: tf.Tensor, labels: tf.Tensor, valid: tf.Tensor, max_boxes: int,
              image_id: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Keeps the valid boxes, in order, padded to `max_boxes`.

    Returns:
      boxes: [max_boxes, 4] float32; labels: [max_boxes] int32; box_valid: [max_boxes] bool.
    Raises:
      tf.errors.InvalidArgumentError: an image has more than `max_boxes` valid boxes (naming the image).
    """
    boxes = tf.boolean_mask(boxes, valid)
    labels = tf.boolean_mask(labels, valid)
    count = tf.shape(boxes)[0]
    check = tf.debugging.Assert(count <= max_boxes, [
        f"An image has more valid boxes than config.data.max_boxes={max_boxes}; raise it. image_id:",
        image_id, "valid boxes:", count])
    with tf.control_dependencies([check]):
        pad = max_boxes - count
    box_valid = tf.sequence_mask(count, max_boxes)
    return (tf.pad(boxes, [[0, pad], [0, 0]]), tf.pad(labels, [[0, pad]]), box_valid)


def preprocess(example: dict[str, tf.Tensor], *, canvas: Sequence[int], short_sides: Sequence[int],
               max_size: float, max_boxes: int, random_flip: bool, seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """One decoded example -> one example of the batch dict (see pipeline.py for the keys).

    Args:
      example: `coco.decode_example` output.
      short_sides: short-side targets; one is drawn per example (multi-scale training) when several.
      random_flip: flip horizontally with probability 1/2.
      seed: [2] int32 stateless seed of this example.
    """
    image, boxes = example["image"], example["boxes"]
    original_size = tf.shape(image)[:2]
    valid = training_targets_mask(boxes, example["is_crowd"], original_size)
    boxes = clip_boxes(boxes, original_size)
    flip_seed, scale_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if random_flip:
        flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        image, boxes = tf.cond(flip, lambda: horizontal_flip(image, boxes), lambda: (image, boxes))
    choice = tf.random.stateless_uniform([], scale_seed, maxval=len(short_sides), dtype=tf.int32)
    scale = resize_scale(original_size, tf.gather(tf.constant(short_sides), choice), max_size, canvas)
    image, boxes, image_size = resize_and_pad(image, boxes, scale, canvas)
    boxes, labels, box_valid = pad_boxes(boxes, example["labels"], valid, max_boxes, example["image_id"])
    return {
        "image": image,
        "image_size": image_size,
        "original_size": original_size,
        "scale": scale,
        "boxes": boxes,
        "labels": labels,
        "box_valid": box_valid,
        "image_id": example["image_id"],
    }
