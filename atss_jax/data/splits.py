"""One split of a prepared dataset: random access to its examples, and the image sizes and box counts (and
annotation JSON, `coco.record_annotations`) recorded at prepare time.

The pipeline needs every image's size before reading any pixels (aspect-ratio buckets, the evaluation
ground truth), and the largest box count before training or evaluating (`Split.check_max_boxes`: an image
with more than config.data.max_boxes boxes is an error). Reading the whole split takes minutes on COCO, so it
is done once, when the dataset is prepared (`record_image_sizes`, called by `datasets.prepare`), and stored
beside the data; the hosts of a job only read those files.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from atss_jax import errors
from atss_jax.data import coco, transforms


class ImageSizesError(errors.Refusal, FileNotFoundError):
    """The image sizes (or box counts) of a split were not recorded, or cannot be read."""


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of a prepared dataset with random access to its serialized examples."""

    builder: tfds.core.DatasetBuilder
    name: str

    @functools.cached_property
    def source(self) -> Sequence[bytes]:
        return self.builder.as_data_source(self.name, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
                                           file_format=coco.FILE_FORMAT)

    @property
    def num_examples(self) -> int:
        return self.builder.info.splits[self.name].num_examples

    @property
    def category_ids(self) -> tuple[int, ...]:
        return coco.category_ids(self.builder)

    @property
    def image_sizes_path(self) -> epath.Path:
        return epath.Path(self.builder.data_path) / f"image_sizes-{self.name}.npy"

    @property
    def box_counts_path(self) -> epath.Path:
        return epath.Path(self.builder.data_path) / f"box_counts-{self.name}.npy"

    @property
    def annotations_path(self) -> epath.Path:
        """The split's original annotation JSON, recorded at prepare time (`coco.record_annotations`) if known."""
        return epath.Path(self.builder.data_path) / coco.ANNOTATIONS_FILE.format(split=self.name)

    def read(self, index: tf.Tensor) -> dict[str, tf.Tensor]:
        """Example `index` (a scalar tensor), image still encoded."""
        serialized = tf.numpy_function(lambda i: self.source[int(i)], [index], tf.string, stateful=False)
        return self.builder.info.features.deserialize_example(
            tf.reshape(serialized, []), decoders={"image": tfds.decode.SkipDecoding()})

    def image_sizes(self) -> np.ndarray:
        """[N, 2] int64 (height, width) of every image, as recorded when the dataset was prepared."""
        return self._recorded(self.image_sizes_path, "image sizes", (self.num_examples, 2))

    def box_counts(self) -> np.ndarray | None:
        """[N] int64 training-target boxes (not crowd, not empty once clipped) of every image, as recorded when
        the dataset was prepared; None for a dataset prepared before they were recorded."""
        if not self.box_counts_path.exists():
            return None
        return self._recorded(self.box_counts_path, "box counts", (self.num_examples,))

    def check_max_boxes(self, max_boxes: int) -> None:
        """Raises ValueError, naming the image with the most boxes, when an image has more training-target boxes
        than ``max_boxes`` (config.data.max_boxes): found here, at start-up, not when that image is reached."""
        counts = self.box_counts()
        if counts is None:
            logging.warning("%s has no box counts recorded (prepared before they were): an image with more than "
                            "config.data.max_boxes=%d boxes is found only when it is read. Run `python -m "
                            "scripts.prepare_data` with the same config to record them.", self.box_counts_path,
                            max_boxes)
            return
        over = np.flatnonzero(counts > max_boxes)
        if over.size:
            worst = int(over[np.argmax(counts[over])])
            example = self.read(tf.constant(worst, tf.int64))
            filename = example["image/filename"].numpy().decode() if "image/filename" in example else "?"
            raise errors.ConfigError(
                f"Split {self.name!r} of {self.builder.info.full_name!r}: image {filename} (id "
                f"{int(example['image/id'])}) has {int(counts[worst])} boxes (training targets: not crowd, not "
                f"empty), more than config.data.max_boxes={max_boxes}; {over.size} of {self.num_examples} images "
                f"exceed it. Set config.data.max_boxes to at least {int(counts[worst])}.")

    def _recorded(self, path: epath.Path, what: str, shape: tuple[int, ...]) -> np.ndarray:
        """An array recorded at prepare time, checked to have ``shape``."""
        if not path.exists():
            raise ImageSizesError(
                f"The {what} of {self.builder.info.full_name!r} split {self.name!r} are not recorded "
                f"({path} is missing). Run `python -m scripts.prepare_data` with the same --config and "
                f"--config.data.* flags: on a prepared dataset it only records the {what}.")
        try:
            with path.open("rb") as f:
                values = np.load(f)
        except (OSError, ValueError, tf.errors.OpError) as error:
            raise ImageSizesError(f"Cannot read the {what} {path} ({type(error).__name__}: {error}); "
                                  "delete it and run `python -m scripts.prepare_data` again.") from error
        if values.shape != shape:
            raise ImageSizesError(f"{path} holds {what} of shape {values.shape}, but split {self.name!r} has "
                                  f"{self.num_examples} examples: the dataset was prepared again without them. "
                                  "Delete it and run `python -m scripts.prepare_data` again.")
        return values

    def read_sizes_and_box_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """From the examples: ([N, 2] int64 (height, width) of every image, from the encoded headers (JPEG) or
        pixels (others); [N] int64 training-target boxes of every image)."""
        ds = tf.data.Dataset.range(self.num_examples).map(self._image_statistics,
                                                          num_parallel_calls=tf.data.AUTOTUNE)
        sizes = np.zeros((self.num_examples, 2), np.int64)
        counts = np.zeros(self.num_examples, np.int64)
        for start, (size, count) in zip(range(0, self.num_examples, 1024), ds.batch(1024).as_numpy_iterator()):
            sizes[start:start + len(size)] = size
            counts[start:start + len(count)] = count
        return sizes, counts

    def _image_statistics(self, index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        example = self.read(index)
        size = self._image_size(example["image"])
        boxes = coco.pixel_boxes(example["objects"]["bbox"], size)
        # The pipeline's own definition of a training target (transforms.pad_boxes keeps these).
        valid = transforms.training_targets_mask(boxes, tf.cast(example["objects"]["is_crowd"], tf.bool), size)
        return tf.cast(size, tf.int64), tf.reduce_sum(tf.cast(valid, tf.int64))

    @staticmethod
    def _image_size(encoded: tf.Tensor) -> tf.Tensor:
        # JPEG headers give the size without decoding; other formats are decoded.
        if_jpeg = tf.strings.substr(encoded, 0, 2) == b"\xff\xd8"
        return tf.cond(if_jpeg, lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                       lambda: tf.shape(transforms.decode_image(encoded))[:2])


def record_image_sizes(builder: tfds.core.DatasetBuilder) -> None:
    """Writes the image sizes and box counts of every split of the prepared `builder` that has them not yet
    recorded."""
    for name in builder.info.splits:
        split = Split(builder, name)
        missing = [path for path in (split.image_sizes_path, split.box_counts_path) if not path.exists()]
        if not missing:
            continue
        logging.info("Recording the image sizes and box counts of %s split %r (%d images).",
                     builder.info.full_name, name, split.num_examples)
        for path, values in zip((split.image_sizes_path, split.box_counts_path), split.read_sizes_and_box_counts()):
            if path in missing:
                coco.write_whole(path, lambda writer, values=values: np.save(writer, values))
