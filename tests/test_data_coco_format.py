"""The COCO-format builder on a small folder the test writes; malformed annotations give clear errors."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from atss_jax import coco_eval
from atss_jax.data import coco, coco_format, datasets, pipeline, splits
from configs import demo
from tests.test_data_coco import pycocotools_stats

CATEGORIES = [{"id": 40, "name": "kite"}, {"id": 7, "name": "train"}, {"id": 12, "name": "bench"}]


def _write(folder, images, annotations, categories=CATEGORIES):
    path = os.path.join(folder, "annotations.json")
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


@pytest.fixture(scope="module")
def custom_config(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("custom"))
    rng = np.random.default_rng(0)
    images = []
    for image_id, (height, width, encode) in enumerate([(30, 40, tf.io.encode_png), (50, 20, tf.io.encode_jpeg),
                                                        (32, 32, tf.io.encode_png)], start=100):
        name = f"img{image_id}.{'png' if encode is tf.io.encode_png else 'jpg'}"
        tf.io.write_file(os.path.join(folder, name), encode(rng.integers(0, 255, (height, width, 3), np.uint8)))
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
    annotations = [
        {"id": 1, "image_id": 100, "category_id": 12, "bbox": [2, 3, 10, 12], "area": 90.5, "iscrowd": 0},
        {"id": 2, "image_id": 100, "category_id": 40, "bbox": [35, 20, 10, 20], "area": 50, "iscrowd": 0},
        {"id": 3, "image_id": 101, "category_id": 7, "bbox": [1, 1, 15, 40], "area": 300, "iscrowd": 1},
        # A segment area just above 32**2: medium for pycocotools, small and medium once truncated to 1024.
        {"id": 4, "image_id": 102, "category_id": 40, "bbox": [0, 0, 32, 32], "area": 1024.5, "iscrowd": 0},
    ]
    path = _write(folder, images, annotations)
    config = demo.get_config("tiny")
    config.data.name = "coco_format"
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.data.canvas = (64, 64)
    config.data.eval_min_size = 32
    config.data.coco_format.name = "my_dataset"
    config.data.coco_format.annotations.train = path
    config.data.coco_format.images.train = folder
    config.data.coco_format.annotations.validation = path
    config.data.coco_format.images.validation = folder
    datasets.prepare(config.data)
    return config.data


def test_features_match_coco_2017(custom_config):
    builder = datasets.get_builder(custom_config)
    assert builder.info.features.get_tensor_info() == tfds.builder("coco/2017").info.features.get_tensor_info()


def test_categories_sorted_by_id_with_ids_kept(custom_config):
    builder = datasets.get_builder(custom_config)
    assert coco.category_ids(builder) == (7, 12, 40)
    assert builder.info.features["objects"]["label"].names == ["train", "bench", "kite"]


def test_examples_through_the_pipeline(custom_config):
    data = pipeline.eval_dataset(custom_config, batch_per_host=4, process_index=0, process_count=1)
    (batch,) = list(data.dataset.as_numpy_iterator())
    assert batch["example_valid"].tolist() == [True, True, True, False]
    row = batch["image_id"].tolist().index(100)
    count = int(batch["box_valid"][row].sum())
    assert count == 2
    # The second box overhangs the 40-px-wide image: clipped to it.
    np.testing.assert_allclose(batch["boxes"][row, :2] / batch["scale"][row], [[2, 3, 12, 15], [35, 20, 40, 30]],
                               atol=1e-3)
    np.testing.assert_array_equal(batch["labels"][row, :2], [1, 2])
    crowd_row = batch["image_id"].tolist().index(101)
    assert not batch["box_valid"][crowd_row].any(), "crowd boxes are not training targets"


def _prepare(folder, images, annotations, categories=CATEGORIES):
    path = _write(folder, images, annotations, categories)
    return coco_format.prepare("bad", {"train": path}, {"train": folder}, os.path.join(folder, "tfds"))


IMAGE = {"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}


@pytest.mark.parametrize("images, annotations, categories, message", [
    ([IMAGE], [{"id": 1, "image_id": 1, "category_id": 99, "bbox": [0, 0, 2, 2]}], CATEGORIES, "unknown category_id"),
    ([IMAGE], [{"id": 1, "image_id": 5, "category_id": 7, "bbox": [0, 0, 2, 2]}], CATEGORIES, "unknown image_id"),
    ([IMAGE], [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 2]}], CATEGORIES, "4 finite numbers"),
    ([IMAGE], [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, -2, 2]}], CATEGORIES, "negative"),
    ([IMAGE], [{"id": 1, "image_id": 1, "category_id": 7}], CATEGORIES, r"lacks \['bbox'\]"),
    ([{"id": 1, "file_name": "a.jpg"}], [], CATEGORIES, "lacks"),
    ([IMAGE], [], [], "'categories' is empty"),
    ([{**IMAGE, "file_name": "missing.jpg"}], [], CATEGORIES, "does not exist"),
])
def test_malformed_annotations_are_clear_errors(tmp_path, images, annotations, categories, message):
    tf.io.write_file(str(tmp_path / "a.jpg"), tf.io.encode_jpeg(np.zeros((10, 10, 3), np.uint8)))
    with pytest.raises(coco_format.AnnotationError, match=message):
        _prepare(str(tmp_path), images, annotations, categories)


def test_unreadable_annotation_files(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(coco_format.AnnotationError, match="not valid JSON"):
        coco_format.load_annotations(str(tmp_path / "broken.json"))
    with pytest.raises(coco_format.AnnotationError, match="does not exist"):
        coco_format.load_annotations(str(tmp_path / "nothing.json"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(coco_format.AnnotationError, match="expected a JSON object"):
        coco_format.load_annotations(str(tmp_path / "list.json"))


def test_unprepared_custom_dataset_is_a_clear_error(tmp_path):
    config = demo.get_config("tiny").data
    config.name = "coco_format"
    config.coco_format.name = "never_prepared"
    config.data_dir = str(tmp_path)
    with pytest.raises(coco.DatasetNotFoundError, match="never_prepared"):
        datasets.get_builder(config)


def test_dataset_without_random_access_names_the_conversion(tmp_path):
    tf.io.write_file(str(tmp_path / "a.jpg"), tf.io.encode_jpeg(np.zeros((10, 10, 3), np.uint8)))
    path = _write(str(tmp_path), [IMAGE], [])
    builder = coco_format.CocoFormat(
        config=coco_format.CocoFormatConfig(name="streamed", annotations={"train": path},
                                            images={"train": str(tmp_path)}),
        data_dir=str(tmp_path / "tfds"), file_format="tfrecord")
    builder.download_and_prepare(file_format="tfrecord")
    with pytest.raises(coco.DatasetNotFoundError, match="tfds convert_format"):
        coco.open_builder("coco_format/streamed", str(tmp_path / "tfds"))


def test_image_sizes_recorded_at_prepare_time_match_decoded_images(custom_config):
    split = pipeline.open_split(custom_config, "train")
    assert split.image_sizes_path.exists()  # written by datasets.prepare, not by the reader
    sizes = split.image_sizes()
    decoded = [tf.shape(coco.decode_example(split.read(tf.constant(i, tf.int64)))["image"])[:2].numpy()
               for i in range(split.num_examples)]
    np.testing.assert_array_equal(sizes, decoded)


def test_missing_or_stale_image_sizes_are_clear_errors(custom_config):
    split = pipeline.open_split(custom_config, "train")
    recorded = split.image_sizes_path.read_bytes()
    try:
        split.image_sizes_path.unlink()
        with pytest.raises(splits.ImageSizesError, match=r"not recorded.*scripts\.prepare_data"):
            split.image_sizes()
        with split.image_sizes_path.open("wb") as f:
            np.save(f, np.zeros((split.num_examples + 1, 2), np.int64))
        with pytest.raises(splits.ImageSizesError, match="prepared again"):
            split.image_sizes()
        split.image_sizes_path.unlink()
        datasets.prepare(custom_config)  # a prepared dataset: only the sizes are recorded again
        assert split.image_sizes_path.read_bytes() == recorded
    finally:
        split.image_sizes_path.write_bytes(recorded)


@pytest.mark.parametrize("evaluator", coco_eval.EVALUATORS)
def test_evaluation_ground_truth_scores_exactly_like_the_configured_json(custom_config, evaluator):
    """The split's JSON is recorded at prepare time and is the evaluation ground truth: the 12 numbers are
    pycocotools' on the configured file, although the split clips the overhanging box and truncates 1024.5."""
    path = custom_config.coco_format.annotations.validation
    split = pipeline.open_split(custom_config, "validation")
    with open(path, "rb") as f:
        assert split.annotations_path.read_bytes() == f.read()
    detections = [
        {"image_id": 100, "category_id": 12, "bbox": [2, 3, 10, 12], "score": 0.9},
        # The overhanging [35, 20, 10, 20] clipped to the image: IoU 0.5 with the annotated box, 1 once clipped.
        {"image_id": 100, "category_id": 40, "bbox": [35, 20, 5, 20], "score": 0.8},
        {"image_id": 101, "category_id": 7, "bbox": [1, 1, 15, 40], "score": 0.7},  # on the crowd: ignored
        {"image_id": 102, "category_id": 40, "bbox": [0, 0, 32, 32], "score": 0.6},
        {"image_id": 102, "category_id": 7, "bbox": [0, 0, 16, 16], "score": 0.5},  # a false positive
    ]
    want = pycocotools_stats(path, detections)
    got, _ = coco_eval.coco_metrics(coco_eval.ground_truth(split), detections, evaluator)
    assert got == pytest.approx(want, abs=1e-12)
    from_split, _ = coco_eval.coco_metrics(coco_eval.ground_truth_from_split(split), detections, evaluator)
    for metric in ("AP", "APs"):  # the clipped box, the truncated area
        assert from_split[metric] != pytest.approx(want[metric], abs=1e-3), metric
