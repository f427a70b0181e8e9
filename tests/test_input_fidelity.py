"""What reaches the network matches the official ATSS input: the short side and long-side cap whatever the
image's orientation (aspect-ratio buckets), and images normalised before they are zero-padded."""

import json

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from etils import epath

from atss_jax.data import datasets, pipeline
from atss_jax.models.detector import build_detector, normalise
from atss_jax.models.resnet import ResNet
from configs import atss_r50_fpn_1x_coco, demo

# (image id, height, width) and the resized (height, width) the official sizes give, by hand: short side
# 800, long side at most 1333.
PORTRAIT = (1, 640, 480, (1067, 800))  # 800 / 480 = 5/3: 640 * 5/3 = 1066.7
LANDSCAPE = (2, 480, 640, (800, 1067))
TALL = (3, 640, 240, (1333, 500))  # 800 / 240 would make 2133 rows: capped, 1333 / 640 * 240 = 499.9


@pytest.fixture(scope="module")
def coco_config(tmp_path_factory):
    """configs/atss_r50_fpn_1x_coco.py on a three-image COCO-format dataset (train = validation)."""
    folder = epath.Path(tmp_path_factory.mktemp("portrait"))
    images, annotations = [], []
    for image_id, height, width, _ in (PORTRAIT, LANDSCAPE, TALL):
        name = f"{image_id}.png"
        tf.io.write_file(str(folder / name), tf.io.encode_png(np.full((height, width, 3), 90, np.uint8)))
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
        annotations.append({"id": image_id, "image_id": image_id, "category_id": 1, "bbox": [10, 20, 100, 50],
                            "area": 5000, "iscrowd": 0})
    path = folder / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": 1, "name": "thing"}]}))
    config = atss_r50_fpn_1x_coco.get_config()
    config.data.name = "coco_format"
    config.data.coco_format.name = "orientations"
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    for split in ("train", "validation"):
        config.data.coco_format.annotations[split] = str(path)
        config.data.coco_format.images[split] = str(folder)
    datasets.prepare(config.data)
    return config


def _sizes_by_image(batches) -> dict[int, tuple[tuple[int, int], tuple[int, int]]]:
    """{image id: (canvas (height, width), image_size)} of the valid examples."""
    out = {}
    for batch in batches:
        for row, image_id in enumerate(batch["image_id"]):
            if batch.get("example_valid", np.ones(len(batch["image_id"]), bool))[row]:
                out[int(image_id)] = (tuple(batch["image"].shape[1:3]), tuple(batch["image_size"][row]))
    return out


def test_every_orientation_gets_the_official_size_in_training_and_evaluation(coco_config):
    data = coco_config.data
    assert (tuple(data.min_sizes), data.eval_min_size, data.max_size) == ((800,), 800, 1333)
    train = pipeline.train_dataset(data, global_batch=1, seed=0, process_index=0, process_count=1)
    evaluation = pipeline.eval_dataset(data, batch_per_host=1, process_index=0, process_count=1)
    for batches in (list(train.take(3).as_numpy_iterator()), list(evaluation.dataset.as_numpy_iterator())):
        sizes = _sizes_by_image(batches)
        assert sizes == {
            PORTRAIT[0]: ((1344, 800), PORTRAIT[3]),
            LANDSCAPE[0]: ((800, 1344), LANDSCAPE[3]),
            TALL[0]: ((1344, 800), TALL[3]),
        }
        for batch in batches:
            height, width = batch["image_size"][0]
            image = batch["image"][0]
            assert (image[:height, :width] == 90).all() and not image[height:].any() and not image[:, width:].any()


def _canvases(seed: int, count: int, canvas: tuple[int, int]) -> np.ndarray:
    """[count, *canvas, 3] uint8 with random pixels everywhere: what lies in the padding must not matter."""
    return np.random.default_rng(seed).integers(0, 256, (count, *canvas, 3), dtype=np.uint8)


def _reference(images: np.ndarray, sizes: list[tuple[int, int]], channels: str, mean, std) -> np.ndarray:
    """The official input by hand: each image cropped to its size, channels reordered, normalised in float64,
    then zero-padded to the canvas (maskrcnn-benchmark's to_image_list)."""
    out = np.zeros(images.shape, np.float64)
    for i, (height, width) in enumerate(sizes):
        image = images[i, :height, :width].astype(np.float64)
        if channels == "bgr":
            image = image[..., ::-1]
        out[i, :height, :width] = (image - np.asarray(mean)) / np.asarray(std)
    return out


@pytest.mark.parametrize("channels, mean, std", [
    ("rgb", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),  # torchvision / mmdetection
    ("bgr", (102.9801, 115.9465, 122.7717), (1.0, 1.0, 1.0)),  # Detectron's Caffe2 weights (official ATSS)
])
def test_normalise_then_zero_pad(channels, mean, std):
    sizes = [(40, 64), (64, 24), (64, 64)]
    images = _canvases(0, len(sizes), (64, 64))
    got = normalise(jnp.asarray(images), jnp.asarray(sizes, jnp.int32), channels, mean, std)
    np.testing.assert_allclose(np.asarray(got), _reference(images, sizes, channels, mean, std), rtol=1e-6, atol=1e-5)


def test_bgr_swaps_the_channels_before_the_mean():
    image = np.zeros((1, 32, 32, 3), np.uint8)
    image[0, 0, 0] = (10, 20, 30)  # RGB
    got = normalise(jnp.asarray(image), jnp.asarray([[32, 32]]), "bgr", (1.0, 2.0, 3.0), (1.0, 2.0, 4.0))
    np.testing.assert_allclose(np.asarray(got)[0, 0, 0], [(30 - 1) / 1, (20 - 2) / 2, (10 - 3) / 4])


class _BackboneReached(Exception):
    """Raised with the backbone's input, so the test needs neither variables nor the network's compile."""


def _backbone_input(interceptor_next, args, kwargs, context):
    if isinstance(context.module, ResNet) and context.method_name == "__call__":
        raise _BackboneReached(args[0])
    return interceptor_next(*args, **kwargs)


def test_detector_feeds_the_backbone_the_normalised_zero_padded_image():
    """ATSSDetector built from the config hands the backbone the hand-made official input of a uint8 canvas."""
    config = demo.get_config("tiny")
    config.model.input_channels = "bgr"
    config.model.pixel_mean = (102.9801, 115.9465, 122.7717)
    config.model.pixel_std = (1.0, 1.0, 1.0)
    model = build_detector(config.model, anchors_per_location=1)
    sizes = [(64, 40), (37, 96)]
    images = _canvases(1, len(sizes), (64, 96))
    with nn.intercept_methods(_backbone_input), pytest.raises(_BackboneReached) as reached:
        model.apply({}, jnp.asarray(images), jnp.asarray(sizes, jnp.int32))
    want = _reference(images, sizes, "bgr", config.model.pixel_mean, config.model.pixel_std)
    np.testing.assert_allclose(np.asarray(reached.value.args[0]), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("field, value, message", [
    ("input_channels", "rgba", "input_channels='rgba'"),
    ("pixel_mean", (1.0, 2.0), "pixel_mean"),
    ("pixel_std", (1.0, 1.0, 1.0, 1.0), "pixel_std"),
    ("pixel_std", (1.0, 0.0, 1.0), "positive"),
])
def test_bad_normalisation_config_is_a_clear_error(field, value, message):
    config = demo.get_config("tiny")
    config.model[field] = value
    with pytest.raises(ValueError, match=message):
        build_detector(config.model, anchors_per_location=1)
