"""Hostile COCO-format data gets a clear error naming the file, or the right result (issue 19, data side):
EXIF-rotated and resized images, evaluation on boxes overhanging the image, corrupt images, a stale prepared
dataset, too many boxes in an image, malformed ids and names."""

import contextlib
import copy
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from atss_jax import coco_eval
from atss_jax.data import coco, coco_format, datasets, pipeline
from atss_jax.data.splits import Split
from configs import demo

CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}]

# The displayed image of the EXIF cases: 40 wide, 24 high, white in the box [5, 3, 15, 11) (xyxy), black elsewhere.
DISPLAYED = np.zeros((24, 40, 3), np.uint8)
DISPLAYED[3:11, 5:15] = 255
BOX_XYWH = [5, 3, 10, 8]


def _exif_app1(orientation: int) -> bytes:
    """A minimal EXIF APP1 segment: a big-endian TIFF header and one IFD holding only the orientation tag."""
    entry = (0x0112).to_bytes(2, "big") + (3).to_bytes(2, "big") + (1).to_bytes(4, "big")  # tag, SHORT, count 1
    entry += orientation.to_bytes(2, "big") + b"\0\0"
    tiff = b"MM" + (42).to_bytes(2, "big") + (8).to_bytes(4, "big") + (1).to_bytes(2, "big") + entry + b"\0" * 4
    segment = b"Exif\0\0" + tiff
    return b"\xff\xe1" + (len(segment) + 2).to_bytes(2, "big") + segment


def _jpeg(pixels: np.ndarray, orientation: int | None = None) -> bytes:
    encoded = tf.io.encode_jpeg(pixels, quality=100).numpy()
    return encoded if orientation is None else encoded[:2] + _exif_app1(orientation) + encoded[2:]


def _data_config(folder, splits: dict[str, str], name="hostile", max_boxes=8):
    config = demo.get_config("tiny").data
    config.name = "coco_format"
    config.data_dir = os.path.join(folder, "tfds")
    config.max_boxes = max_boxes
    config.coco_format.name = name
    config.coco_format.annotations = {split: path for split, path in splits.items()}
    config.coco_format.images = {split: folder for split in splits}
    config.train_split = config.eval_split = next(iter(splits))
    return config


def _write_json(folder, images, annotations, categories=CATEGORIES, name="annotations.json") -> str:
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return path


def _pycocotools(annotation_file: str, detections: list[dict]) -> list[float]:
    """The reference: pycocotools run directly on a JSON file."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(annotation_file)
        evaluation = COCOeval(gt, gt.loadRes(copy.deepcopy(detections)), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [float(s) for s in evaluation.stats]


# --- item 1: EXIF orientation and sizes that disagree with the JSON ---------------------------------------------

# Orientation -> the stored pixels that display as DISPLAYED, inverted by hand from the EXIF definition
# (6: turn 90 degrees clockwise to display; 8: counter-clockwise; 3: half a turn; 5: mirror across the diagonal).
STORED = {1: DISPLAYED, 3: DISPLAYED[::-1, ::-1], 5: DISPLAYED.transpose(1, 0, 2), 6: np.rot90(DISPLAYED, 1),
          8: np.rot90(DISPLAYED, -1)}


def test_exif_tag_read_as_pil_reads_it():
    image_module = pytest.importorskip("PIL.Image")
    for orientation in range(1, 9):
        encoded = _jpeg(DISPLAYED, orientation)
        assert image_module.open(io.BytesIO(encoded)).getexif()[0x0112] == orientation
        assert coco_format.exif_orientation(encoded) == orientation
    assert coco_format.exif_orientation(_jpeg(DISPLAYED)) == 1


def test_exif_rotated_photos_are_stored_upright_with_their_boxes(tmp_path):
    folder = str(tmp_path)
    images, annotations = [], []
    for i, (orientation, stored) in enumerate(STORED.items(), start=1):
        tf.io.write_file(os.path.join(folder, f"o{orientation}.jpg"), _jpeg(np.ascontiguousarray(stored), orientation))
        # As an annotation tool shows the photo: the displayed size and the box on the displayed image.
        images.append({"id": i, "file_name": f"o{orientation}.jpg", "width": 40, "height": 24})
        annotations.append({"id": i, "image_id": i, "category_id": 3, "bbox": BOX_XYWH, "area": 80})
    config = _data_config(folder, {"train": _write_json(folder, images, annotations)})
    datasets.prepare(config)
    split = pipeline.open_split(config, "train")
    inside = np.zeros((24, 40), bool)
    inside[3:11, 5:15] = True
    for i in range(split.num_examples):
        example = coco.decode_example(split.read(tf.constant(i, tf.int64)))
        image = example["image"].numpy()
        assert image.shape == (24, 40, 3), int(example["image_id"])
        np.testing.assert_allclose(example["boxes"].numpy(), [[5, 3, 15, 11]], atol=1e-4)
        gray = image.mean(axis=2)
        assert gray[inside].min() > 200 and gray[~inside].max() < 55, int(example["image_id"])
    np.testing.assert_array_equal(split.image_sizes(), [[24, 40]] * len(STORED))


def test_images_whose_size_disagrees_with_the_json_are_all_named(tmp_path):
    folder = str(tmp_path)
    tf.io.write_file(os.path.join(folder, "rotated.jpg"), _jpeg(np.ascontiguousarray(STORED[6]), 6))
    tf.io.write_file(os.path.join(folder, "resized.jpg"), _jpeg(DISPLAYED[::2, ::2].copy()))
    tf.io.write_file(os.path.join(folder, "good.jpg"), _jpeg(DISPLAYED))
    images = [
        # The JSON describes the stored pixels, but the EXIF tag turns the photo upright: 40 x 24 as displayed.
        {"id": 1, "file_name": "rotated.jpg", "width": 24, "height": 40},
        {"id": 2, "file_name": "resized.jpg", "width": 40, "height": 24},  # a half-size copy
        {"id": 3, "file_name": "good.jpg", "width": 40, "height": 24},
    ]
    config = _data_config(folder, {"train": _write_json(folder, images, [])})
    with pytest.raises(coco_format.BadImagesError) as error:
        datasets.prepare(config)
    message = str(error.value)
    assert os.path.join(folder, "rotated.jpg") in message and "EXIF orientation 6" in message
    assert os.path.join(folder, "resized.jpg") in message and "is 20 x 12" in message
    assert "good.jpg" not in message and "2 of 3 images" in message


# --- item 2: evaluation ground truth is the user's JSON, unchanged ------------------------------------------------

@pytest.mark.parametrize("evaluator", coco_eval.EVALUATORS)
def test_evaluation_equals_pycocotools_on_the_users_json_with_overhanging_boxes(tmp_path, evaluator):
    folder = str(tmp_path)
    images = []
    for image_id in (1, 2):
        tf.io.write_file(os.path.join(folder, f"{image_id}.png"), tf.io.encode_png(np.zeros((30, 40, 3), np.uint8)))
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 40, "height": 30})
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [30, 10, 20, 15], "area": 300, "iscrowd": 0},  # x overhangs
        {"id": 2, "image_id": 1, "category_id": 9, "bbox": [-6, -4, 16, 14], "area": 224, "iscrowd": 0},  # overhangs
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
        {"id": 4, "image_id": 2, "category_id": 9, "bbox": [25, 5, 10, 10], "area": 100, "iscrowd": 0},
    ]
    path = _write_json(folder, images, annotations)
    config = _data_config(folder, {"validation": path})
    datasets.prepare(config)
    data = pipeline.eval_dataset(config, batch_per_host=2, process_index=0, process_count=1)
    # Device-side detections (xyxy pixels, label indices 0 = category 3, 1 = category 9) through the project's
    # conversion (clipped to the image): a perfect one on image 2, partial ones (overhanging boxes clipped,
    # a shifted box, a false positive).
    boxes = np.array([[[30, 10, 50, 25], [-6, -4, 10, 10], [0, 0, 5, 5]],
                      [[4, 4, 24, 24], [27, 5, 37, 15], [0, 20, 8, 28]]], np.float32)
    detections = coco_eval.detections_to_coco(
        np.array([1, 2]), boxes, np.array([[0.9, 0.8, 0.3], [0.95, 0.7, 0.2]]), np.array([[0, 1, 0], [0, 1, 1]]),
        np.ones((2, 3), bool), np.array([[30, 40], [30, 40]]), data.category_ids)
    want = _pycocotools(path, detections)
    got, _ = coco_eval.coco_metrics(coco_eval.ground_truth(data.split), detections, evaluator)
    assert [got[m] for m in coco_eval.METRIC_NAMES] == pytest.approx(want, abs=1e-12)
    # The split itself holds the clipped boxes: scoring against it would give other numbers.
    from_split, _ = coco_eval.coco_metrics(coco_eval.ground_truth_from_split(data.split), detections, evaluator)
    assert from_split["AP"] != pytest.approx(want[0], abs=1e-3)


# --- item 4: corrupt images ----------------------------------------------------------------------------------------

def test_corrupt_images_are_listed_or_skipped_with_ground_truth_to_match(tmp_path):
    folder = str(tmp_path)
    good = _jpeg(DISPLAYED)
    tf.io.write_file(os.path.join(folder, "good1.jpg"), good)
    tf.io.write_file(os.path.join(folder, "good2.jpg"), good)
    tf.io.write_file(os.path.join(folder, "truncated.jpg"), good[:len(good) // 3])
    tf.io.write_file(os.path.join(folder, "garbage.png"), b"\x89PNG\r\n\x1a\nnot really a png")
    names = ["good1.jpg", "truncated.jpg", "good2.jpg", "garbage.png"]
    images = [{"id": i, "file_name": n, "width": 40, "height": 24} for i, n in enumerate(names, start=1)]
    annotations = [{"id": i, "image_id": i, "category_id": 3, "bbox": BOX_XYWH, "area": 80, "iscrowd": 0}
                   for i in range(1, 5)]
    path = _write_json(folder, images, annotations)
    config = _data_config(folder, {"validation": path})
    with pytest.raises(coco_format.BadImagesError) as error:
        datasets.prepare(config)
    message = str(error.value)
    assert os.path.join(folder, "truncated.jpg") in message and os.path.join(folder, "garbage.png") in message
    assert "good1" not in message and "--skip_bad_images" in message
    with pytest.raises(coco.DatasetNotFoundError):  # nothing half-prepared is left to be used
        datasets.get_builder(config)

    builder = datasets.prepare(config, skip_bad_images=True)
    skipped = coco_format.skipped_images(builder)["validation"]
    assert sorted(s["file_name"] for s in skipped) == ["garbage.png", "truncated.jpg"]
    split = pipeline.open_split(config, "validation")
    assert split.num_examples == 2
    # Evaluation scores against the user's JSON without the left-out images (filtered here by hand).
    kept = {"images": [images[0], images[2]], "annotations": [annotations[0], annotations[2]],
            "categories": CATEGORIES}
    kept_path = _write_json(folder, kept["images"], kept["annotations"], name="kept.json")
    detections = [{"image_id": 1, "category_id": 3, "bbox": BOX_XYWH, "score": 0.9},
                  {"image_id": 3, "category_id": 3, "bbox": [5, 3, 10, 16], "score": 0.8}]
    got, _ = coco_eval.coco_metrics(coco_eval.ground_truth(split), detections, "pycocotools")
    assert [got[m] for m in coco_eval.METRIC_NAMES] == pytest.approx(_pycocotools(kept_path, detections), abs=1e-12)


# --- item 5: a prepared dataset whose source changed ----------------------------------------------------------------

def test_changed_annotations_or_image_folder_are_detected(tmp_path):
    folder = str(tmp_path)
    tf.io.write_file(os.path.join(folder, "a.jpg"), _jpeg(DISPLAYED))
    images = [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 24}]
    annotation = {"id": 1, "image_id": 1, "category_id": 3, "bbox": BOX_XYWH, "area": 80}
    path = _write_json(folder, images, [annotation])
    config = _data_config(folder, {"train": path})
    builder = datasets.prepare(config)
    datasets.prepare(config)  # unchanged: reused
    _write_json(folder, images, [{**annotation, "bbox": [1, 1, 20, 20]}])
    for stale_use in (lambda: datasets.prepare(config), lambda: datasets.get_builder(config)):
        with pytest.raises(coco_format.StaleDatasetError, match="annotation file") as error:
            stale_use()
        assert path in str(error.value) and f"Delete {builder.data_path}" in str(error.value)

    _write_json(folder, images, [annotation])  # back as prepared (rewritten: checked by content, not time)
    datasets.prepare(config)
    # An image replaced under its own name (other pixels, a later time): refused at start-up, naming it.
    tf.io.write_file(os.path.join(folder, "a.jpg"), _jpeg(DISPLAYED[::-1]))
    later = os.stat(os.path.join(folder, "a.jpg")).st_mtime + 5
    os.utime(os.path.join(folder, "a.jpg"), (later, later))
    with pytest.raises(coco_format.StaleDatasetError, match=r"1 image file\(s\) in .* a\.jpg"):
        datasets.get_builder(config)
    # A new file in the image folder.
    tf.io.write_file(os.path.join(folder, "b.jpg"), _jpeg(DISPLAYED))
    with pytest.raises(coco_format.StaleDatasetError, match=f"image folder {folder}"):
        datasets.prepare(config)


# --- item 11: more boxes than config.data.max_boxes -----------------------------------------------------------------

def test_too_many_boxes_is_found_at_start_naming_the_image(tmp_path):
    folder = str(tmp_path)
    for name in ("few.jpg", "many.jpg"):
        tf.io.write_file(os.path.join(folder, name), _jpeg(DISPLAYED))
    images = [{"id": 7, "file_name": "few.jpg", "width": 40, "height": 24},
              {"id": 8, "file_name": "many.jpg", "width": 40, "height": 24}]
    boxes = [(7, [0, 0, 5, 5], 0), (8, [0, 0, 5, 5], 0), (8, [10, 10, 5, 5], 0), (8, [35, 20, 20, 20], 0),
             (8, [0, 0, 30, 20], 1),  # crowd: not a training target
             (8, [50, 0, 5, 5], 0),  # right of the 40-px-wide image: empty once clipped
             (8, [3, 3, 0, 4], 0)]  # zero width
    annotations = [{"id": i, "image_id": image_id, "category_id": 3, "bbox": bbox, "iscrowd": crowd}
                   for i, (image_id, bbox, crowd) in enumerate(boxes, start=1)]
    config = _data_config(folder, {"train": _write_json(folder, images, annotations)}, max_boxes=2)
    builder = datasets.prepare(config)  # prepares whatever max_boxes is
    # The reference: a plain loop over the JSON (not crowd, non-empty once clipped to the image).
    want = []
    for image in images:
        count = 0
        for a in annotations:
            x, y, w, h = a["bbox"]
            clipped_w = min(x + w, image["width"]) - max(x, 0)
            clipped_h = min(y + h, image["height"]) - max(y, 0)
            count += a["image_id"] == image["id"] and not a["iscrowd"] and clipped_w > 0 and clipped_h > 0
        want.append(count)
    assert want == [1, 3]
    split = Split(builder, "train")
    ids = [int(split.read(tf.constant(i, tf.int64))["image/id"]) for i in range(split.num_examples)]
    np.testing.assert_array_equal(split.box_counts(), [want[[7, 8].index(i)] for i in ids])  # split order
    with pytest.raises(ValueError, match=r"image many\.jpg \(id 8\) has 3 boxes.*max_boxes=2.*at least 3"):
        pipeline.train_dataset(config, global_batch=2, seed=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=r"many\.jpg"):
        pipeline.eval_dataset(config, batch_per_host=2, process_index=0, process_count=1)
    config.max_boxes = 3
    pipeline.open_split(config, "train")


# --- item 12: ids and names -----------------------------------------------------------------------------------------

IMAGE = {"id": 1, "file_name": "a.jpg", "width": 40, "height": 24}
ANNOTATION = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 4]}


@pytest.mark.parametrize("images, annotations, categories, message", [
    ([{**IMAGE, "id": "1"}], [], CATEGORIES, r"images\[0\] has id '1' \(str\); ids must be integers"),
    ([IMAGE, {**IMAGE, "file_name": "b.jpg"}], [], CATEGORIES, r"images\[0\] and images\[1\] share id 1"),
    ([IMAGE], [ANNOTATION, {**ANNOTATION, "bbox": [1, 1, 2, 2]}], CATEGORIES,
     r"annotations\[0\] and annotations\[1\] share id 1"),
    ([IMAGE], [], [{"id": 1, "name": "cat"}, {"id": 2, "name": "cat"}],
     r"category name 'cat' is used by category ids \[1, 2\]"),
    ([IMAGE], [], [{"id": 1.0, "name": "cat"}], r"categories\[0\] has id 1.0 \(float\)"),
    ([{**IMAGE, "width": "40"}], [], CATEGORIES, r"image id 1 \(a\.jpg\) has width, height \['40', 24\]"),
])
def test_malformed_ids_and_names_are_one_clear_line(tmp_path, images, annotations, categories, message):
    folder = str(tmp_path)
    tf.io.write_file(os.path.join(folder, "a.jpg"), _jpeg(DISPLAYED))
    path = _write_json(folder, images, annotations, categories)
    with pytest.raises(coco_format.AnnotationError, match=message) as error:
        datasets.prepare(_data_config(folder, {"train": path}))
    assert str(error.value).startswith(f"Annotation file {path}: ") and "\n" not in str(error.value)
