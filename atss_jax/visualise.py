"""Drawing detections and assignments on images (uint8 arrays, PNG files)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from etils import epath

_PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212]], np.float32)


def draw_boxes(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """image [H, W, 3] uint8 with boxes [N, 4] (xyxy pixels) outlined in their class colours."""
    height, width = image.shape[:2]
    if len(boxes) == 0:
        return image
    normalised = np.stack([boxes[:, 1] / height, boxes[:, 0] / width, boxes[:, 3] / height, boxes[:, 2] / width], 1)
    colours = _PALETTE[np.asarray(classes) % len(_PALETTE)] / 255.0
    out = image.astype(np.float32)[None] / 255.0
    for box, colour in zip(normalised, colours):  # draw_bounding_boxes colours by box order: one call per box
        out = tf.image.draw_bounding_boxes(out, box[None, None].astype(np.float32), colour[None]).numpy()
    return (out[0] * 255).round().astype(np.uint8)


def draw_batch_detections(batch: dict, detections: dict, count: int, *, score_threshold: float) -> list[np.ndarray]:
    """Up to `count` valid images of an eval batch, cropped to the image, with their detections drawn."""
    images = []
    for i in np.flatnonzero(batch["example_valid"])[:count]:
        height, width = batch["image_size"][i]
        keep = detections["valid"][i] & (detections["scores"][i] >= score_threshold)
        boxes = detections["boxes"][i][keep] * batch["scale"][i]  # back to canvas pixels
        images.append(draw_boxes(batch["image"][i][:height, :width], boxes, detections["classes"][i][keep]))
    return _same_size(images)


def _same_size(images: list[np.ndarray]) -> list[np.ndarray]:
    """Zero-pads images to a common size (TensorBoard image summaries need one shape)."""
    if not images:
        return images
    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    return [np.pad(im, ((0, height - im.shape[0]), (0, width - im.shape[1]), (0, 0))) for im in images]


def write_pngs(images: list[np.ndarray], directory: str | epath.PathLike, prefix: str = "detections") -> list[str]:
    """Writes ``<directory>/<prefix>_<i>.png`` per image (``directory`` may be a bucket); returns the paths."""
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = directory / f"{prefix}_{i}.png"
        path.write_bytes(tf.io.encode_png(image).numpy())
        paths.append(str(path))
    return paths
