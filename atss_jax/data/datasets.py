"""config.data -> a prepared TFDS builder (COCO, a COCO-format dataset, or the synthetic demo)."""

from __future__ import annotations

import functools

import ml_collections
import tensorflow_datasets as tfds
from etils import epath

from atss_jax import errors
from atss_jax.data import coco, coco_format, downloads, splits, synthetic

COCO_FORMAT = "coco_format"
SYNTHETIC = "synthetic_shapes"


def builder_name(data_config: ml_collections.ConfigDict) -> str:
    """The TFDS name the configured dataset is prepared under."""
    if data_config.name == COCO_FORMAT:
        if not data_config.coco_format.name:
            raise errors.ConfigError("config.data.name='coco_format' needs config.data.coco_format.name.")
        return f"{COCO_FORMAT}/{data_config.coco_format.name}"
    if data_config.name == SYNTHETIC:
        return f"{COCO_FORMAT}/{synthetic.dataset_name(data_config.synthetic)}"
    return data_config.name


def prepare(data_config: ml_collections.ConfigDict, skip_bad_images: bool = False,
            download_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Prepares the configured dataset if needed (downloading COCO through TFDS), records its image sizes and
    box counts (`splits.record_image_sizes`) and the annotation JSON of its splits (`coco.record_annotations`;
    of TFDS's COCO the validation JSON, found in its downloads) if they are not yet, then opens it.

    A COCO-format dataset has every image decoded and checked (`coco_format.prepare`; ``skip_bad_images``
    leaves undecodable ones out) and, when prepared already, its annotation files and image folders compared
    with those it was prepared from (`coco_format.StaleDatasetError`).

    ``download_dir`` (TFDS's COCO; a local folder): its archives are first fetched there with downloads that
    resume after an interruption (`downloads.fetch_all`), and TFDS reads them from there."""
    data_dir = data_config.data_dir or None
    if download_dir and data_config.name in (COCO_FORMAT, SYNTHETIC):
        raise errors.ConfigError(f"A download dir is for TFDS's COCO; {data_config.name} downloads nothing.")
    if data_config.name == COCO_FORMAT:
        coco_format.prepare(data_config.coco_format.name, dict(data_config.coco_format.annotations),
                            dict(data_config.coco_format.images), data_dir, skip_bad_images)
    elif data_config.name == SYNTHETIC:
        synthetic.prepare(data_config.synthetic, data_dir)
    else:
        download_config = None
        if download_dir:
            downloads.fetch_all(downloads.tfds_archives(tfds.builder(data_config.name, data_dir=data_dir)),
                                download_dir)
            download_config = tfds.download.DownloadConfig(manual_dir=download_dir)
        coco.prepare_builder(lambda directory: tfds.builder(data_config.name, data_dir=directory), data_dir,
                             coco.tfds_coco_annotation_files, download_config)
    builder = coco.open_builder(builder_name(data_config), data_dir)
    splits.record_image_sizes(builder)
    return builder


def get_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared builder; the synthetic demo is generated on first use (it takes about a minute).

    Raises:
      coco.DatasetNotFoundError: COCO or a COCO-format dataset is not prepared (the message says how).
      coco_format.StaleDatasetError: a COCO-format dataset's annotation files or image folders changed since
        it was prepared (checked once per process).
    """
    if data_config.name == SYNTHETIC:
        return prepare(data_config)
    builder = coco.open_builder(builder_name(data_config), data_config.data_dir)
    if data_config.name == COCO_FORMAT:
        _check_source_once(str(builder.data_path), tuple(data_config.coco_format.annotations.items()),
                           tuple(data_config.coco_format.images.items()))
    return builder


@functools.cache
def _check_source_once(data_path: str, annotations: tuple[tuple[str, str], ...],
                       images: tuple[tuple[str, str], ...]) -> None:
    """`coco_format.check_source`, once per process: every evaluation opens the dataset again, and the check
    reads the annotation files and lists the image folders."""
    coco_format.check_source(epath.Path(data_path), dict(annotations), dict(images))
