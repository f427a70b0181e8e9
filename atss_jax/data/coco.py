"""COCO-format datasets in TFDS: preparing a builder (locally or into a bucket), opening it, category ids, and
decoding one example.

Every dataset the pipeline reads (`coco/2017`, a `coco_format` builder over a researcher's own data,
the synthetic demo) has the features of TFDS's `coco/2017`:

    image           encoded JPEG/PNG bytes (decoded here, RGB, grayscale expanded to 3 channels)
    image/id        int64, the dataset's image id
    objects/bbox    [n, 4] float32, normalised (ymin, xmin, ymax, xmax)
    objects/label   [n] int64, 0..C-1 in category-id order
    objects/is_crowd, objects/area, objects/id

TFDS keeps only the label index, not COCO's category id; `category_ids` gives the map back that
evaluation needs (results files and the official annotations use category ids). TFDS also keeps `area` as
an integer and boxes as fractions of the image (clipped to it), so preparing records each split's original
annotation JSON beside the prepared data (`record_annotations`): evaluation scores against it, as
pycocotools does on that file.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from typing import IO

import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from atss_jax import errors
from atss_jax.data import transforms

# COCO's 80 detection categories are ids 1..90 with ten ids unused; TFDS numbers them 0..79 in id order.
_UNUSED_COCO_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _UNUSED_COCO_IDS)

# Builder metadata key under which `coco_format` builders store their category ids.
CATEGORY_IDS_KEY = "category_ids"

# Random access (needed for a deterministic, resumable order and exact eval splits) reads ArrayRecord.
FILE_FORMAT = "array_record"


class DatasetNotFoundError(errors.Refusal, FileNotFoundError):
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


def is_local(path: str | epath.PathLike | None) -> bool:
    """Whether ``path`` is on this machine (``None``: TFDS's default data dir), not a bucket such as ``gs://``."""
    return path is None or "://" not in str(path)


# What each split's original annotation JSON is recorded as, in the prepared dataset's version folder.
ANNOTATIONS_FILE = "annotations-{split}.json"

# Split -> annotation JSON of a prepared builder (`prepare_builder`'s `annotation_files`).
AnnotationFiles = Callable[[tfds.core.DatasetBuilder], Mapping[str, str | epath.PathLike]]


def prepare_builder(make_builder: Callable[[str | None], tfds.core.DatasetBuilder], data_dir: str | None,
                    annotation_files: AnnotationFiles,
                    download_config: tfds.download.DownloadConfig | None = None) -> tfds.core.DatasetBuilder:
    """``make_builder(data_dir)``, prepared as ArrayRecord if it is not yet, with the annotation JSONs
    ``annotation_files(builder)`` of its splits recorded (`record_annotations`) where they are not yet.

    ArrayRecord's writer opens local files only (its reader also reads gs://), so a dataset for a bucket is
    prepared in a local temporary folder and copied over, the two files that make TFDS count it as
    prepared last. The local disk needs room for the prepared dataset (and, for COCO, the downloads).
    ``download_config`` goes to TFDS (e.g. a ``manual_dir`` of downloads made beforehand).
    """
    builder = make_builder(data_dir)
    if builder.is_prepared() or is_local(data_dir):
        if not builder.is_prepared():
            builder.download_and_prepare(file_format=FILE_FORMAT, download_config=download_config)
        record_annotations(epath.Path(builder.data_path), annotation_files(builder))
        return builder
    with tempfile.TemporaryDirectory(prefix="atss_prepare_") as local:
        local_builder = make_builder(local)
        local_builder.download_and_prepare(file_format=FILE_FORMAT, download_config=download_config)
        # Recorded before the copy, while the local downloads exist; copied with the data.
        record_annotations(epath.Path(local_builder.data_path), annotation_files(local_builder))
        _copy_prepared(epath.Path(local_builder.data_path), epath.Path(builder.data_path))
    return make_builder(data_dir)


def record_annotations(data_path: epath.Path, files: Mapping[str, str | epath.PathLike]) -> None:
    """Copies each split's annotation JSON (split -> file, may be a bucket) into the version folder
    ``data_path`` of a prepared dataset as `ANNOTATIONS_FILE`, unless one is recorded there already."""
    for split, source in files.items():
        target = data_path / ANNOTATIONS_FILE.format(split=split)
        if target.exists():
            continue
        logging.info("Recording the annotations of split %r (%s) as %s.", split, source, target)
        write_whole(target, lambda writer, source=source: _copy_file(epath.Path(source), writer))


def tfds_coco_annotation_files(builder: tfds.core.DatasetBuilder) -> dict[str, epath.Path]:
    """The validation annotation JSON of a TFDS `coco/<year>` builder, found in its extracted downloads
    (TFDS's default download folder, `<data dir>/downloads`), or {} when they are not there.

    Only the validation split's: evaluation reads nothing else, and the training JSON is 450 MB.
    """
    validation = [s for s in getattr(builder.builder_config, "splits", ()) if s.name == tfds.Split.VALIDATION]
    recorded = epath.Path(builder.data_path) / ANNOTATIONS_FILE.format(split=tfds.Split.VALIDATION)
    if not validation or recorded.exists():
        return {}
    extracted = epath.Path(builder.data_dir_root) / "downloads" / "extracted"
    name = f"instances_{validation[0].images}.json"
    found = sorted(extracted.glob(f"*/annotations/{name}")) if extracted.exists() else []
    if len(found) != 1:
        logging.warning("Found %d copies of %s in %s, not one: the annotations are not recorded, so evaluation "
                        "builds the ground truth from the split (coco_eval.ground_truth) unless "
                        "config.eval.annotations_file names the official %s.", len(found), name, extracted, name)
        return {}
    return {str(tfds.Split.VALIDATION): found[0]}


# A version folder with both is a prepared dataset to TFDS (file_utils.is_valid_variant_dir).
_WRITTEN_LAST = ("features.json", "dataset_info.json")


def _copy_prepared(source: epath.Path, target: epath.Path) -> None:
    """Copies a prepared dataset's version folder (flat) to ``target``, TFDS's marker files last."""
    files = sorted((p for p in source.iterdir() if p.is_file()),
                   key=lambda p: _WRITTEN_LAST.index(p.name) + 1 if p.name in _WRITTEN_LAST else 0)
    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        with (target / file.name).open("wb") as writer:
            _copy_file(file, writer)


def _copy_file(source: epath.Path, writer: IO[bytes]) -> None:
    with source.open("rb") as reader:
        shutil.copyfileobj(reader, writer, 64 << 20)


def write_whole(path: epath.Path, write: Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` (may be a bucket) with ``write(file)`` under a unique name, then renames it: a reader
    never sees a partial file."""
    partial = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    with partial.open("wb") as writer:
        write(writer)
    partial.rename(path)


def category_ids(builder: tfds.core.DatasetBuilder) -> tuple[int, ...]:
    """Category id of each label index 0..C-1 of `builder`'s `objects/label`."""
    metadata = builder.info.metadata or {}
    if CATEGORY_IDS_KEY in metadata:
        return tuple(int(i) for i in metadata[CATEGORY_IDS_KEY])
    num_classes = builder.info.features["objects"]["label"].num_classes
    if builder.info.name == "coco" and num_classes == len(COCO_CATEGORY_IDS):
        return COCO_CATEGORY_IDS
    raise errors.ConfigError(
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
    return {
        "image": image,
        "boxes": pixel_boxes(example["objects"]["bbox"], tf.shape(image)[:2]),
        "labels": tf.cast(example["objects"]["label"], tf.int32),
        "is_crowd": tf.cast(example["objects"]["is_crowd"], tf.bool),
        "image_id": tf.cast(example["image/id"], tf.int64),
    }


def pixel_boxes(bbox: tf.Tensor, image_size: tf.Tensor) -> tf.Tensor:
    """TFDS boxes -> pixels: bbox [n, 4] normalised (ymin, xmin, ymax, xmax), image_size [2] (height, width)
    -> [n, 4] float32 xyxy pixels."""
    size = tf.cast(image_size, tf.float32)
    ymin, xmin, ymax, xmax = tf.unstack(tf.reshape(bbox, [-1, 4]), axis=1)
    return tf.stack([xmin * size[1], ymin * size[0], xmax * size[1], ymax * size[0]], axis=1)
