"""One split of a prepared dataset: random access to its examples, and the image sizes (and annotation JSON,
`coco.record_annotations`) recorded at prepare time.

The pipeline needs every image's size before reading any pixels (aspect-ratio buckets, the evaluation
ground truth). Reading the whole split's headers takes minutes on COCO, so it is done once, when the
dataset is prepared (`record_image_sizes`, called by `datasets.prepare`), and stored beside the data;
the hosts of a job only read that file.
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

from atss_jax.data import coco, transforms


class ImageSizesError(FileNotFoundError):
    """The image sizes of a split were not recorded, or cannot be read."""


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
        path = self.image_sizes_path
        if not path.exists():
            raise ImageSizesError(
                f"The image sizes of {self.builder.info.full_name!r} split {self.name!r} are not recorded "
                f"({path} is missing). Run `python -m scripts.prepare_data` with the same --config and "
                f"--config.data.* flags: on a prepared dataset it only records the sizes.")
        try:
            with path.open("rb") as f:
                sizes = np.load(f)
        except (OSError, ValueError, tf.errors.OpError) as error:
            raise ImageSizesError(f"Cannot read the image sizes {path} ({type(error).__name__}: {error}); "
                                  "delete it and run `python -m scripts.prepare_data` again.") from error
        if sizes.shape != (self.num_examples, 2):
            raise ImageSizesError(f"{path} holds sizes of shape {sizes.shape}, but split {self.name!r} has "
                                  f"{self.num_examples} examples: the dataset was prepared again without them. "
                                  "Delete it and run `python -m scripts.prepare_data` again.")
        return sizes

    def read_image_sizes(self) -> np.ndarray:
        """[N, 2] int64 (height, width) of every image from the encoded headers (JPEG) or pixels (others)."""
        ds = tf.data.Dataset.range(self.num_examples).map(self._image_size, num_parallel_calls=tf.data.AUTOTUNE)
        sizes = np.zeros((self.num_examples, 2), np.int64)
        for start, chunk in zip(range(0, self.num_examples, 1024), ds.batch(1024).as_numpy_iterator()):
            sizes[start:start + len(chunk)] = chunk
        return sizes

    def _image_size(self, index: tf.Tensor) -> tf.Tensor:
        encoded = self.read(index)["image"]
        # JPEG headers give the size without decoding; other formats are decoded.
        if_jpeg = tf.strings.substr(encoded, 0, 2) == b"\xff\xd8"
        return tf.cond(if_jpeg, lambda: tf.image.extract_jpeg_shape(encoded)[:2],
                       lambda: tf.shape(transforms.decode_image(encoded))[:2])


def record_image_sizes(builder: tfds.core.DatasetBuilder) -> None:
    """Writes the image sizes of every split of the prepared `builder` that has none recorded yet."""
    for name in builder.info.splits:
        split = Split(builder, name)
        path = split.image_sizes_path
        if path.exists():
            continue
        logging.info("Recording the image sizes of %s split %r (%d images).", builder.info.full_name, name,
                     split.num_examples)
        sizes = split.read_image_sizes()
        coco.write_whole(path, lambda writer, sizes=sizes: np.save(writer, sizes))
