"""COCO-format datasets in TFDS: opening a prepared builder, category ids, and decoding one example.

Every dataset the pipeline reads (`coco/2017`, a `coco_format` builder over a researcher's own data,
the synthetic demo) has the features of TFDS's `coco/2017`:

    image           encoded JPEG/PNG bytes (decoded here, RGB, grayscale expanded to 3 channels)
    image/id        int64, the dataset's image id
    objects/bbox    [n, 4] float32, normalised (ymin, xmin, ymax, xmax)
    objects/label   [n] int64, 0..C-1 in category-id order
    objects/is_crowd, objects/area, objects/id

TFDS keeps only the label index, not COCO's category id; `category_ids` gives the map back that
evaluation needs (results files and the official annotations use category ids).
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

from atss_jax.data import transforms

# COCO's 80 detection categories are ids 1..90 with ten ids unused; TFDS numbers them 0..79 in id order.
_UNUSED_COCO_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _UNUSED_COCO_IDS)

# Builder metadata key under which `coco_format` builders store their category ids.
CATEGORY_IDS_KEY = "category_ids"

# Random access (needed for a deterministic, resumable order and exact eval splits) reads ArrayRecord.
FILE_FORMAT = "array_record"


class DatasetNotFoundError(FileNotFoundError):
    """The configured dataset is not prepared in the data directory."""


def open_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder `name` ("coco/2017", "coco_format/<name>", ...) in `data_dir`.

    Raises:
      DatasetNotFoundError: the dataset is not prepared there, or only in a format without random access.
    """
    data_dir = data_dir or None
    how = ("Prepare it with `python -m scripts.prepare_data --config=<your config>` (README, 'Datasets'), "
           "or set config.data.data_dir to where it is prepared.")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as error:
        # TFDS reports an unprepared coco_format dataset as an unknown builder config.
        raise DatasetNotFoundError(f"Dataset {name!r} is unknown or not prepared in "
                                   f"{data_dir or tfds.core.constants.DATA_DIR!r} ({error}). {how}") from None
    if not builder.is_prepared():
        raise DatasetNotFoundError(f"Dataset {name!r} is not prepared in {builder.data_dir!r}. {how}")
    formats = {str(f.value) for f in builder.info.available_file_formats()} | {str(builder.info.file_format.value)}
    if FILE_FORMAT not in formats:
        raise DatasetNotFoundError(
            f"Dataset {name!r} in {builder.data_dir!r} is stored as {sorted(formats)}, but the pipeline "
            f"needs random access ({FILE_FORMAT}). Convert it once with `tfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format={FILE_FORMAT}`."
        )
    return builder


def category_ids(builder: tfds.core.DatasetBuilder) -> tuple[int, ...]:
    """Category id of each label index 0..C-1 of `builder`'s `objects/label`."""
    metadata = builder.info.metadata or {}
    if CATEGORY_IDS_KEY in metadata:
        return tuple(int(i) for i in metadata[CATEGORY_IDS_KEY])
    num_classes = builder.info.features["objects"]["label"].num_classes
    if builder.info.name == "coco" and num_classes == len(COCO_CATEGORY_IDS):
        return COCO_CATEGORY_IDS
    raise ValueError(
        f"Dataset {builder.info.full_name!r} has no category ids: it is neither COCO nor built by the "
        f"coco_format builder (metadata key {CATEGORY_IDS_KEY!r})."
    )


def decode_example(example: dict) -> dict[str, tf.Tensor]:
    """One TFDS example, its image still encoded, -> pixels and boxes in the original image.

    Returns:
      image: [h, w, 3] uint8; boxes: [n, 4] float32 xyxy pixels of the original image;
      labels: [n] int32; is_crowd: [n] bool; image_id: [] int64.
    """
    image = transforms.decode_image(example["image"])
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(tf.reshape(example["objects"]["bbox"], [-1, 4]), axis=1)
    boxes = tf.stack([xmin * size[1], ymin * size[0], xmax * size[1], ymax * size[0]], axis=1)
    return {
        "image": image,
        "boxes": boxes,
        "labels": tf.cast(example["objects"]["label"], tf.int32),
        "is_crowd": tf.cast(example["objects"]["is_crowd"], tf.bool),
        "image_id": tf.cast(example["image/id"], tf.int64),
    }
