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

Preparing checks the data before the user trains on it: malformed JSON (ids that are not unique integers,
duplicate category names, ...) is an `AnnotationError` before any image is read; every image is then decoded
(a thread pool) and turned upright by its EXIF orientation, and images that cannot be decoded or whose size
differs from their JSON entry are a `BadImagesError` listing each file. A fingerprint of each split's annotation
JSON and image folder (its file names and, when local, each file's size and modification time) is recorded
(`SOURCE_FILE`): preparing again, training or evaluating after they changed is a `StaleDatasetError` naming
what changed.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from atss_jax import errors
from atss_jax.data import transforms
from atss_jax.data.coco import ANNOTATIONS_FILE, CATEGORY_IDS_KEY, FILE_FORMAT, is_local, prepare_builder, write_whole


class AnnotationError(errors.Refusal, ValueError):
    """A COCO-format annotation file is malformed."""


class BadImagesError(AnnotationError):
    """Images of a COCO-format dataset cannot be decoded or disagree with the size their JSON gives."""


class StaleDatasetError(errors.Refusal, ValueError):
    """A prepared COCO-format dataset was built from other annotations or image files than configured now."""


# Recorded beside a prepared dataset (version folder), per split: the fingerprint of the annotation JSON and
# image folder it was built from (`source_fingerprint`) and the images left out (`prepare(skip_bad_images)`).
SOURCE_FILE = "source-{split}.json"


class CocoFormatConfig(tfds.core.BuilderConfig):
    """Where one COCO-format dataset lives: per split, an annotations JSON and an image folder; with
    ``skip_bad_images``, undecodable images are left out (listed in `SOURCE_FILE`) instead of an error."""

    def __init__(self, *, name: str, annotations: Mapping[str, str], images: Mapping[str, str],
                 skip_bad_images: bool = False, **kwargs: Any):
        if not name:
            raise errors.ConfigError("A coco_format dataset needs a name (config.data.coco_format.name).")
        super().__init__(name=name, version=tfds.core.Version("1.0.0"), **kwargs)
        splits = {split for split, path in annotations.items() if path}
        missing_images = sorted(split for split in splits if not images.get(split))
        if missing_images:
            raise errors.ConfigError(f"coco_format dataset {name!r}: no image folder for split(s) {missing_images}.")
        self.annotations = {split: annotations[split] for split in sorted(splits)}
        self.images = {split: images[split] for split in sorted(splits)}
        self.skip_bad_images = skip_bad_images


def load_annotations(path: str) -> dict:
    """Reads and validates a COCO annotations JSON (``path`` may be a bucket); errors name the file and the problem."""
    file = epath.Path(path)
    if not file.exists():  # checked first: TensorFlow's filesystem (epath's default) raises its own NotFoundError
        raise AnnotationError(f"Annotation file {path} does not exist.")
    try:
        data = json.loads(file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
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
    for field_owner in ("images", "categories", "annotations"):
        _check_unique_integer_ids(path, field_owner, data[field_owner])
    names = collections.defaultdict(list)
    for category in data["categories"]:
        names[category["name"]].append(category["id"])
    for name, ids in names.items():
        if len(ids) > 1:
            raise AnnotationError(f"Annotation file {path}: category name {name!r} is used by category ids {ids}; "
                                  "names must be unique (labels are shown and exported by name).")
    for image in data["images"]:
        size = (image["width"], image["height"])
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in size):
            raise AnnotationError(f"Annotation file {path}: image id {image['id']} ({image['file_name']}) has "
                                  f"width, height {list(size)}; they must be positive numbers.")
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


def _check_unique_integer_ids(path: str, field_owner: str, entries: Sequence[dict]) -> None:
    """Every entry's ``id`` is an integer (TFDS stores them as int64; pycocotools looks them up by value)
    used once."""
    first = {}
    for i, entry in enumerate(entries):
        value = entry["id"]
        if not isinstance(value, int) or isinstance(value, bool):
            raise AnnotationError(f"Annotation file {path}: {field_owner}[{i}] has id {value!r} "
                                  f"({type(value).__name__}); ids must be integers.")
        if value in first:
            raise AnnotationError(f"Annotation file {path}: {field_owner}[{first[value]}] and {field_owner}[{i}] "
                                  f"share id {value}; ids must be unique.")
        first[value] = i


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
        return {split: self._generate_examples(split) for split in self.builder_config.annotations}

    def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
        """The split's examples, every image decoded (in parallel) and checked against its JSON size; then,
        in the version folder being written, the split's `SOURCE_FILE` (and, if images were left out, its
        annotation JSON without them).

        Raises:
          BadImagesError: after the whole split, naming every image that cannot be decoded (unless
            ``skip_bad_images``) or whose size differs from the JSON's width and height.
        """
        annotation_path = self.builder_config.annotations[split]
        data = self._annotations(annotation_path)
        label_of_category = {c["id"]: i for i, c in enumerate(_sorted_categories(data))}
        annotations_of_image = collections.defaultdict(list)
        for annotation in data["annotations"]:
            annotations_of_image[annotation["image_id"]].append(annotation)
        image_dir = epath.Path(self.builder_config.images[split])
        # The folder's file names, listed once: one request instead of one per image on a bucket.
        listed = set(_listing(image_dir))
        images = sorted(data["images"], key=lambda im: im["id"])
        for image in images:
            if image["file_name"] not in listed and not (image_dir / image["file_name"]).exists():
                # e.g. a file name with a sub-folder is not in the listing
                raise AnnotationError(f"Annotation file {annotation_path}: image {image_dir / image['file_name']} "
                                      "does not exist.")
        undecodable, mismatched, skipped = [], [], []
        for image, loaded in zip(images, _load_images(image_dir, images)):
            if loaded.problem:
                (undecodable if loaded.encoded is None else mismatched).append(loaded.problem)
                if loaded.encoded is None and self.builder_config.skip_bad_images:
                    skipped.append({"id": image["id"], "file_name": image["file_name"], "problem": loaded.problem})
                continue
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
                "image": loaded.encoded,
                "image/filename": image["file_name"],
                "image/id": image["id"],
                "objects": objects,
            }
        problems = mismatched + ([] if self.builder_config.skip_bad_images else undecodable)
        if problems:
            how = ("Fix or remove the undecodable images, or run scripts/prepare_data.py with --skip_bad_images to "
                   "prepare without them. " if undecodable and not self.builder_config.skip_bad_images else "")
            if mismatched:
                how += ("Give each image's real width and height in the JSON, with its boxes in that image (for a "
                        "resized copy, scale the boxes too; EXIF-rotated photos count as displayed, as mmdetection "
                        "and detectron2 decode them).")
            raise BadImagesError(f"Annotation file {annotation_path} (split {split!r}): {len(problems)} of "
                                 f"{len(images)} images cannot be used:\n  " + "\n  ".join(problems) + f"\n{how}")
        # self.data_path is the version folder being written: these files appear with the dataset, atomically.
        if skipped:
            logging.warning("Left out %d undecodable images of split %r (--skip_bad_images): %s", len(skipped), split,
                            "; ".join(s["problem"] for s in skipped))
            left_out = {s["id"] for s in skipped}
            kept = {**data, "images": [im for im in data["images"] if im["id"] not in left_out],
                    "annotations": [a for a in data["annotations"] if a["image_id"] not in left_out]}
            # Evaluation scores against the recorded JSON: it must describe the split as prepared.
            (self.data_path / ANNOTATIONS_FILE.format(split=split)).write_text(json.dumps(kept))
        record = {**source_fingerprint(annotation_path, str(image_dir)), "skipped_images": skipped}
        (self.data_path / SOURCE_FILE.format(split=split)).write_text(json.dumps(record, indent=1))


def _listing(image_dir: epath.Path) -> list[str]:
    """The sorted file names in ``image_dir`` ([] when it is not a folder)."""
    return sorted(p.name for p in image_dir.iterdir()) if image_dir.is_dir() else []


class _Loaded(NamedTuple):
    """One image as stored in the dataset: ``encoded`` None when it cannot be decoded; ``problem`` says why,
    or how its size disagrees with the JSON (then ``encoded`` is set but unused)."""

    encoded: bytes | None
    problem: str


# How many images are read and decoded at a time: bounds the memory held, keeps the thread pool busy.
_LOAD_CHUNK = 64


def _load_images(image_dir: epath.Path, images: Sequence[dict]) -> Iterator[_Loaded]:
    """`_load_image` of every image, in order, decoded by a thread pool (TensorFlow's decoders release the GIL)."""
    with concurrent.futures.ThreadPoolExecutor() as pool:
        for start in range(0, len(images), _LOAD_CHUNK):
            chunk = images[start:start + _LOAD_CHUNK]
            yield from pool.map(lambda image: _load_image(image_dir / image["file_name"], image), chunk)


def _load_image(path: epath.Path, image: dict) -> _Loaded:
    """Reads and decodes ``path`` with the pipeline's decoder, turns it upright by its EXIF orientation as
    mmdetection (OpenCV) and detectron2 do (re-encoded losslessly as PNG; other images are stored as they are),
    and compares its size with the JSON entry ``image``'s width and height."""
    try:
        encoded = path.read_bytes()
        pixels = transforms.decode_image(tf.constant(encoded)).numpy()
    except (OSError, tf.errors.OpError) as error:
        message = getattr(error, "message", str(error)).strip().splitlines()[0]
        return _Loaded(None, f"{path}: cannot be decoded ({type(error).__name__}: {message})")
    orientation = exif_orientation(encoded)
    if orientation != 1:
        pixels = apply_exif_orientation(pixels, orientation)
        encoded = tf.io.encode_png(pixels).numpy()
    height, width = pixels.shape[:2]
    if (round(image["width"]), round(image["height"])) != (width, height):
        rotated = f" once turned by its EXIF orientation {orientation}" if orientation != 1 else ""
        return _Loaded(encoded, f"{path}: the JSON gives width x height {image['width']} x {image['height']}, "
                                f"the image is {width} x {height}{rotated}")
    return _Loaded(encoded, "")


def exif_orientation(encoded: bytes) -> int:
    """The EXIF orientation tag (1..8) of JPEG bytes: 1 (upright) when there is none or it is unreadable."""
    if encoded[:2] != b"\xff\xd8":
        return 1
    position = 2
    while position + 4 <= len(encoded) and encoded[position] == 0xFF:
        marker = encoded[position + 1]
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no metadata after them
            break
        length = int.from_bytes(encoded[position + 2:position + 4], "big")
        segment = encoded[position + 4:position + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\0\0":
            return _tiff_orientation(segment[6:])
        position += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of the first IFD of an EXIF TIFF block (the image's own, not its thumbnail's)."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd:ifd + 2], order)
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry:entry + 2], order) == 0x0112:
            value = int.from_bytes(tiff[entry + 8:entry + 10], order)  # a SHORT, first in the value field
            return value if 1 <= value <= 8 else 1
    return 1


# EXIF orientation -> (mirror left-right first, then quarter turns counter-clockwise) that shows it upright.
_UPRIGHT = {1: (False, 0), 2: (True, 0), 3: (False, 2), 4: (True, 2), 5: (True, 1), 6: (False, 3), 7: (True, 3),
            8: (False, 1)}


def apply_exif_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """[h, w, c] stored pixels -> the image as displayed under EXIF ``orientation`` ([w, h, c] for 5..8)."""
    mirror, turns = _UPRIGHT[orientation]
    return np.ascontiguousarray(np.rot90(pixels[:, ::-1] if mirror else pixels, turns))


def source_fingerprint(annotations: str, images: str) -> dict:
    """What a split is built from: the annotation JSON's sha256, the sha256 of the image folder's file names
    (renamed, added or removed files), and, for a local folder, each file's size and modification time (a file
    replaced under the same name). A folder in a bucket has no per-file record: a stat per object would cost a
    request each, at every start."""
    image_dir = epath.Path(images) if images else None
    names = _listing(image_dir) if image_dir else []
    stats = {}
    if image_dir and is_local(images):
        annotation_file = epath.Path(annotations)
        stats = {name: [(stat := (image_dir / name).stat()).length, stat.mtime] for name in names
                 if image_dir / name != annotation_file}  # a JSON kept beside its images is checked by content
    return {"annotations": annotations,
            "annotations_sha256": hashlib.sha256(epath.Path(annotations).read_bytes()).hexdigest(),
            "images": images, "image_files_sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
            "image_files": stats}


def recorded_source(data_path: epath.Path, split: str) -> dict | None:
    """The `SOURCE_FILE` of ``split`` in a prepared dataset's version folder, None if it has none."""
    path = data_path / SOURCE_FILE.format(split=split)
    return json.loads(path.read_text()) if path.exists() else None


def check_source(data_path: epath.Path, annotations: Mapping[str, str], images: Mapping[str, str]) -> None:
    """Checks that the prepared dataset in ``data_path`` was built from the configured files (split ->
    annotation JSON, image folder) as they are now; splits without a record, and files that are gone (e.g. on
    a machine that only reads the prepared copy), are not checked.

    Raises:
      StaleDatasetError: an annotation file or image folder changed since preparing (the message says how to
        rebuild).
    """
    for split, annotation_path in annotations.items():
        recorded = recorded_source(data_path, split)
        if not annotation_path or recorded is None or not epath.Path(annotation_path).exists():
            continue
        image_dir = images.get(split) or ""
        now = source_fingerprint(annotation_path, image_dir)
        changed = []
        if now["annotations_sha256"] != recorded["annotations_sha256"]:
            changed.append(f"the annotation file {annotation_path}")
        if image_dir and epath.Path(image_dir).is_dir() and now["image_files_sha256"] != recorded["image_files_sha256"]:
            changed.append(f"the file names in the image folder {image_dir}")
        elif recorded.get("image_files") and now["image_files"]:
            replaced = sorted(name for name, stat in recorded["image_files"].items()
                              if now["image_files"].get(name, stat) != stat)
            if replaced:
                shown = ", ".join(replaced[:5]) + (f" and {len(replaced) - 5} more" if len(replaced) > 5 else "")
                changed.append(f"{len(replaced)} image file(s) in {image_dir} (size or modification time: {shown})")
        if changed:
            raise StaleDatasetError(
                f"Split {split!r} of the dataset prepared in {data_path} is stale: {' and '.join(changed)} changed "
                f"since it was prepared (from {recorded['annotations']}, {recorded['images']}). Training and "
                f"evaluation would read the old examples. Delete {data_path} and run `python -m "
                "scripts.prepare_data` with the same config again to rebuild it.")


def version_dir(name: str, data_dir: str | None) -> epath.Path:
    """Where `prepare` puts the dataset ``name``'s files (TFDS's layout: <data_dir>/coco_format/<name>/<version>)."""
    root = epath.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()
    return root / "coco_format" / name / str(CocoFormat.VERSION)


def prepare(name: str, annotations: Mapping[str, str], images: Mapping[str, str], data_dir: str | None,
            skip_bad_images: bool = False) -> CocoFormat:
    """Prepares (once) the COCO-format dataset `name` under `data_dir` (may be a bucket) in the pipeline's
    file format, each split's annotation JSON recorded beside it for evaluation (`coco.record_annotations`)
    and its source fingerprinted (`SOURCE_FILE`).

    Every image is decoded once here: undecodable ones and ones whose size differs from their JSON entry are
    a `BadImagesError` naming each file (``skip_bad_images``: undecodable ones are left out instead).

    Raises:
      StaleDatasetError: the dataset is prepared, from other annotation files or image folders.
    """
    config = CocoFormatConfig(name=name, annotations=annotations, images=images, skip_bad_images=skip_bad_images)
    target = version_dir(name, data_dir)
    check_source(target, config.annotations, config.images)
    builder = prepare_builder(
        lambda directory: CocoFormat(config=config, data_dir=directory, file_format=FILE_FORMAT),
        data_dir, lambda builder: config.annotations)
    # Datasets prepared before the fingerprints were recorded: from now on, changes are seen.
    for split in config.annotations:
        if recorded_source(epath.Path(builder.data_path), split) is None:
            record = {**source_fingerprint(config.annotations[split], config.images[split]), "skipped_images": []}
            write_whole(epath.Path(builder.data_path) / SOURCE_FILE.format(split=split),
                        lambda writer, record=record: writer.write(json.dumps(record, indent=1).encode()))
    return builder


def skipped_images(builder: tfds.core.DatasetBuilder) -> dict[str, list[dict]]:
    """Split -> the images `prepare(skip_bad_images=True)` left out of it (id, file_name, problem)."""
    records = {split: recorded_source(epath.Path(builder.data_path), split) for split in builder.info.splits}
    return {split: record["skipped_images"] for split, record in records.items() if record}
