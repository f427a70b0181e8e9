"""A TFDS builder for any COCO-format detection dataset: an annotations JSON and an image folder per split.

The examples have the features of TFDS's `coco/2017`, so the same pipeline, training and evaluation
run on a researcher's own data. The builder's name in TFDS is `coco_format/<config name>`, prepared
under `<data_dir>/coco_format/<config name>/<version>`; the category ids and names are stored in the
builder's metadata (TFDS's `coco/2017` drops the ids).

    builder = CocoFormat(config=CocoFormatConfig(name="my_data",
                                                 annotations={"train": ".../train.json", ...},
                                                 images={"train": ".../train_images", ...}),
                         data_dir=...)
    builder.download_and_prepare(file_format="array_record")
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from atss_jax.data.coco import CATEGORY_IDS_KEY, FILE_FORMAT, prepare_builder


class AnnotationError(ValueError):
    """A COCO-format annotation file is malformed."""


class CocoFormatConfig(tfds.core.BuilderConfig):
    """Where one COCO-format dataset lives: per split, an annotations JSON and an image folder."""

    def __init__(self, *, name: str, annotations: Mapping[str, str], images: Mapping[str, str], **kwargs: Any):
        if not name:
            raise ValueError("A coco_format dataset needs a name (config.data.coco_format.name).")
        super().__init__(name=name, version=tfds.core.Version("1.0.0"), **kwargs)
        splits = {split for split, path in annotations.items() if path}
        missing_images = sorted(split for split in splits if not images.get(split))
        if missing_images:
            raise ValueError(f"coco_format dataset {name!r}: no image folder for split(s) {missing_images}.")
        self.annotations = {split: annotations[split] for split in sorted(splits)}
        self.images = {split: images[split] for split in sorted(splits)}


def load_annotations(path: str) -> dict:
    """Reads and validates a COCO annotations JSON (``path`` may be a bucket); errors name the file and the problem."""
    file = epath.Path(path)
    if not file.exists():  # checked first: TensorFlow's filesystem (epath's default) raises its own NotFoundError
        raise AnnotationError(f"Annotation file {path} does not exist.")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise AnnotationError(f"Annotation file {path} is not valid JSON: {error}.") from None
    if not isinstance(data, dict):
        raise AnnotationError(f"Annotation file {path}: expected a JSON object, got {type(data).__name__}.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"Annotation file {path}: missing list {key!r}.")
    if not data["categories"]:
        raise AnnotationError(f"Annotation file {path}: 'categories' is empty.")
    for field_owner, fields in (("images", ("id", "file_name", "width", "height")),
                                ("categories", ("id", "name")),
                                ("annotations", ("id", "image_id", "category_id", "bbox"))):
        for i, entry in enumerate(data[field_owner]):
            missing = [f for f in fields if f not in entry]
            if missing:
                raise AnnotationError(f"Annotation file {path}: {field_owner}[{i}] lacks {missing}.")
    image_ids = {image["id"] for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    for annotation in data["annotations"]:
        where = f"Annotation file {path}: annotation id {annotation['id']}"
        bbox = annotation["bbox"]
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and np.isfinite(v) for v in bbox):
            raise AnnotationError(f"{where}: bbox must be 4 finite numbers [x, y, width, height], got {bbox}.")
        if bbox[2] < 0 or bbox[3] < 0:
            raise AnnotationError(f"{where}: negative bbox width or height {bbox}.")
        if annotation["image_id"] not in image_ids:
            raise AnnotationError(f"{where}: unknown image_id {annotation['image_id']}.")
        if annotation["category_id"] not in category_ids:
            raise AnnotationError(f"{where}: unknown category_id {annotation['category_id']}.")
    return data


def _sorted_categories(data: dict) -> list[dict]:
    return sorted(data["categories"], key=lambda c: c["id"])


class CocoFormat(tfds.core.GeneratorBasedBuilder):
    """Any COCO-format dataset, with the features of `coco/2017`."""

    VERSION = tfds.core.Version("1.0.0")
    # Configs are made at run time from config.data.coco_format, not registered here.
    BUILDER_CONFIGS: ClassVar[list] = []

    def _annotations(self, path: str) -> dict:
        """`load_annotations(path)`, read once per builder (the info and every split's examples need it)."""
        if not hasattr(self, "_loaded_annotations"):
            self._loaded_annotations = {}
        if path not in self._loaded_annotations:
            self._loaded_annotations[path] = load_annotations(path)
        return self._loaded_annotations[path]

    def _categories(self) -> list[dict]:
        splits = self.builder_config.annotations
        categories = _sorted_categories(self._annotations(next(iter(splits.values()))))
        for split, path in splits.items():
            if _sorted_categories(self._annotations(path)) != categories:
                raise AnnotationError(f"Annotation file {path} (split {split!r}) has different categories.")
        return categories

    def _info(self) -> tfds.core.DatasetInfo:
        # Prepared datasets are read back with tfds.builder_from_directory, so the annotation files
        # are only needed (and read) when preparing.
        categories = self._categories()
        metadata = tfds.core.MetadataDict({CATEGORY_IDS_KEY: [int(c["id"]) for c in categories]})
        return self.dataset_info_from_configs(
            description="A COCO-format detection dataset (annotations JSON + image folder per split).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "image/filename": tfds.features.Text(),
                "image/id": np.int64,
                "objects": tfds.features.Sequence({
                    "id": np.int64,
                    "area": np.int64,
                    "bbox": tfds.features.BBoxFeature(),
                    "label": tfds.features.ClassLabel(names=[c["name"] for c in categories]),
                    "is_crowd": np.bool_,
                }),
            }),
            metadata=metadata,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        del dl_manager  # the files are given (local paths or buckets), not downloaded
        return {
            split: self._generate_examples(self.builder_config.annotations[split], self.builder_config.images[split])
            for split in self.builder_config.annotations
        }

    def _generate_examples(self, annotation_path: str, image_dir: str):
        data = self._annotations(annotation_path)
        label_of_category = {c["id"]: i for i, c in enumerate(_sorted_categories(data))}
        annotations_of_image = collections.defaultdict(list)
        for annotation in data["annotations"]:
            annotations_of_image[annotation["image_id"]].append(annotation)
        image_dir = epath.Path(image_dir)
        # The folder's file names, listed once: one request instead of one per image on a bucket.
        listed = {p.name for p in image_dir.iterdir()} if data["images"] and image_dir.is_dir() else set()
        for image in sorted(data["images"], key=lambda im: im["id"]):
            path = image_dir / image["file_name"]
            if image["file_name"] not in listed and not path.exists():  # e.g. a file name with a sub-folder
                raise AnnotationError(f"Annotation file {annotation_path}: image {path} does not exist.")
            width, height = float(image["width"]), float(image["height"])
            objects = []
            for annotation in sorted(annotations_of_image[image["id"]], key=lambda a: a["id"]):
                x, y, w, h = annotation["bbox"]
                # BBoxFeature requires normalised coordinates in [0, 1]; COCO boxes can overhang by rounding.
                ymin, xmin = np.clip([y / height, x / width], 0.0, 1.0)
                ymax, xmax = np.clip([(y + h) / height, (x + w) / width], 0.0, 1.0)
                objects.append({
                    "id": annotation["id"],
                    "area": int(annotation.get("area", w * h)),
                    "bbox": tfds.features.BBox(ymin=ymin, xmin=xmin, ymax=ymax, xmax=xmax),
                    "label": label_of_category[annotation["category_id"]],
                    "is_crowd": bool(annotation.get("iscrowd", 0)),
                })
            yield image["id"], {
                "image": path.read_bytes(),  # read here through epath, so the folder may be a bucket
                "image/filename": image["file_name"],
                "image/id": image["id"],
                "objects": objects,
            }


def prepare(name: str, annotations: Mapping[str, str], images: Mapping[str, str], data_dir: str | None) -> CocoFormat:
    """Prepares (once) the COCO-format dataset `name` under `data_dir` (may be a bucket) in the pipeline's
    file format, each split's annotation JSON recorded beside it for evaluation (`coco.record_annotations`)."""
    config = CocoFormatConfig(name=name, annotations=annotations, images=images)
    return prepare_builder(lambda directory: CocoFormat(config=config, data_dir=directory, file_format=FILE_FORMAT),
                           data_dir, lambda builder: config.annotations)
