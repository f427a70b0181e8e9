"""The synthetic demo dataset: simple shapes on textured backgrounds, written in COCO format.

Four shape classes (the class is the shape, never the colour) in random colours, sizes from 8 px to
most of the image (log-uniform, so small, medium and large objects all occur), aspect ratios 1:3 to
3:1, partial overlaps, landscape and portrait images. `prepare` writes JPEGs and COCO annotation
JSONs (area = visible pixel count, like COCO's segment area; boxes = tight bounds of the shape) and
prepares them with the `coco_format` builder, so the demo exercises exactly the path of real data.
Deterministic by seed: image i of a split depends only on (seed, split, i).
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from atss_jax.data import coco, coco_format

CLASSES = ("rectangle", "ellipse", "triangle", "cross")
_SPLIT_SALT = {"train": 0, "validation": 1}
# Bumped whenever the generator's output changes, so prepared copies are not reused by mistake.
_GENERATOR_VERSION = 2
# Placements overlapping an earlier shape by more than this fraction of either box are redrawn, so
# every object stays mostly visible and its box (the whole shape) is well defined.
_MAX_OVERLAP = 0.25


def dataset_name(synthetic_config: ml_collections.ConfigDict) -> str:
    """A name that changes whenever the generated data would."""
    c = synthetic_config
    return (f"synthetic_shapes_gen{_GENERATOR_VERSION}_n{c.num_train}_v{c.num_validation}_s{c.seed}"
            f"_px{c.min_image_side}to{c.max_image_side}_obj{c.max_objects}")


def _shape_mask(shape: str, height: int, width: int) -> np.ndarray:
    """[height, width] bool mask of `shape` filling its box (tight: touches all four sides)."""
    y = (np.arange(height) + 0.5) / height  # pixel centres in [0, 1]
    x = (np.arange(width) + 0.5) / width
    yy, xx = np.meshgrid(y, x, indexing="ij")
    if shape == "rectangle":
        mask = np.ones((height, width), bool)
    elif shape == "ellipse":
        mask = (2 * xx - 1) ** 2 + (2 * yy - 1) ** 2 <= 1.0
    elif shape == "triangle":  # apex at the top centre
        mask = np.abs(xx - 0.5) <= 0.5 * yy
    else:  # cross: two bars a third of the box thick
        mask = (np.abs(xx - 0.5) <= 1 / 6) | (np.abs(yy - 0.5) <= 1 / 6)
    # Thin shapes can lose their outermost rows/columns to sampling; mark the box edges touched so the
    # annotated box is exactly the image extent of the drawn object.
    mask[0, width // 2] = mask[-1, width // 2] = mask[height // 2, 0] = mask[height // 2, -1] = True
    return mask


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """[h, w, 3] float32 in [0, 255]: a smooth random colour field plus fine grain."""
    coarse = rng.uniform(40, 200, size=(4, 4, 3))
    wy = np.clip(1 - np.abs(np.linspace(0, 3, height)[:, None] - np.arange(4)), 0, None)
    wx = np.clip(1 - np.abs(np.linspace(0, 3, width)[:, None] - np.arange(4)), 0, None)
    field = np.einsum("hi,ijc,wj->hwc", wy, coarse, wx)
    stripes = 12 * np.sin(np.arange(width) * rng.uniform(0.2, 1.2) + rng.uniform(0, 6))[None, :, None]
    return field + stripes * rng.integers(0, 2) + rng.normal(0, 8, size=(height, width, 3))


def generate_image(seed: int, split: str, index: int, config: ml_collections.ConfigDict) -> tuple[np.ndarray, list]:
    """One image and its objects.

    Returns:
      image: [h, w, 3] uint8; objects: list of (class index, [x, y, w, h] COCO bbox, visible area).
    """
    rng = np.random.default_rng([seed, _SPLIT_SALT[split], index])
    long_side = int(rng.integers(config.min_image_side, config.max_image_side + 1))
    short_side = int(rng.integers(config.min_image_side, long_side + 1))
    height, width = (short_side, long_side) if rng.random() < 0.6 else (long_side, short_side)
    image = _background(rng, height, width)
    owner = np.full((height, width), -1)  # which object each pixel shows
    boxes = []
    for _ in range(int(rng.integers(1, config.max_objects + 1))):
        for _attempt in range(10):
            size = np.exp(rng.uniform(np.log(8), np.log(0.8 * min(height, width))))
            ratio = np.exp(rng.uniform(np.log(1 / 3), np.log(3)))
            w = int(np.clip(round(size * np.sqrt(ratio)), 4, width))
            h = int(np.clip(round(size / np.sqrt(ratio)), 4, height))
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            if all(_overlap(x, y, w, h, *other) <= _MAX_OVERLAP for _, other in boxes):
                break
        else:
            continue
        label = int(rng.integers(len(CLASSES)))
        mask = _shape_mask(CLASSES[label], h, w)
        colour = rng.uniform(0, 255, size=3)
        region = image[y:y + h, x:x + w]
        region[mask] = colour + rng.normal(0, 6, size=(int(mask.sum()), 3))
        owner[y:y + h, x:x + w][mask] = len(boxes)
        boxes.append((label, (x, y, w, h)))
    objects = []
    for i, (label, (x, y, w, h)) in enumerate(boxes):
        visible = int((owner == i).sum())
        if visible:
            objects.append((label, [x, y, w, h], visible))
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def _overlap(x, y, w, h, ox, oy, ow, oh) -> float:
    """Intersection over the smaller of the two boxes."""
    iw = max(0, min(x + w, ox + ow) - max(x, ox))
    ih = max(0, min(y + h, oy + oh) - max(y, oy))
    return iw * ih / min(w * h, ow * oh)


def source_paths(directory: epath.Path) -> dict[str, tuple[str, str]]:
    """split -> (annotation JSON, image folder) of the COCO-format files in ``directory``."""
    return {split: (str(directory / "annotations" / f"instances_{split}.json"), str(directory / "images" / split))
            for split in _SPLIT_SALT}


def write_coco(directory: str | epath.PathLike, config: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
    """Writes images/<split>/*.jpg and annotations/instances_<split>.json (``directory`` may be a bucket);
    returns split -> (json, folder)."""
    paths = source_paths(epath.Path(directory))
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    for split, count in (("train", config.num_train), ("validation", config.num_validation)):
        annotation_path, image_dir = (epath.Path(p) for p in paths[split])
        image_dir.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            pixels, objects = generate_image(config.seed, split, index, config)
            file_name = f"{index:06d}.jpg"
            (image_dir / file_name).write_bytes(tf.io.encode_jpeg(pixels, quality=92).numpy())
            image_id = index + 1
            images.append({"id": image_id, "file_name": file_name, "height": pixels.shape[0],
                           "width": pixels.shape[1]})
            for label, bbox, area in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                    "bbox": bbox, "area": area, "iscrowd": 0})
        annotation_path.parent.mkdir(parents=True, exist_ok=True)
        annotation_path.write_text(json.dumps({"images": images, "annotations": annotations,
                                               "categories": categories}))
    return paths


def source_dir(config: ml_collections.ConfigDict, data_dir: str | None) -> str:
    """Where the COCO-format files of the synthetic dataset are written (under the data dir: may be a bucket)."""
    root = epath.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()
    return str(root / "synthetic_shapes_source" / dataset_name(config))


def prepare(config: ml_collections.ConfigDict, data_dir: str | None) -> None:
    """Generates and prepares the synthetic dataset once; later calls only record the annotation JSONs
    (`coco.record_annotations`) of a dataset prepared without them, from its generated files."""
    name = dataset_name(config)
    builder = _prepared_builder(name, data_dir)
    if builder is None:
        paths = write_coco(source_dir(config, data_dir), config)
        coco_format.prepare(name, {split: p[0] for split, p in paths.items()},
                            {split: p[1] for split, p in paths.items()}, data_dir)
        return
    sources = source_paths(epath.Path(source_dir(config, data_dir)))
    coco.record_annotations(epath.Path(builder.data_path), {split: annotations for split, (annotations, _) in
                                                            sources.items() if epath.Path(annotations).exists()})


def _prepared_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder | None:
    try:
        builder = tfds.builder(f"coco_format/{name}", data_dir=data_dir)
    except Exception:
        return None
    return builder if builder.is_prepared() else None
