"""A fake COCO 2017 tree prepared by the REAL TFDS coco/2017 builder, read through the pipeline."""

import contextlib
import io
import json
import logging
import os
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from atss_jax import coco_eval
from atss_jax.data import coco, datasets, downloads, pipeline
from configs import demo

# (image id, height, width, grayscale); annotations per image id: (category id, [x, y, w, h], iscrowd).
IMAGES = {
    "train2017": [(11, 48, 64, False), (12, 60, 40, True), (13, 40, 56, False), (14, 52, 52, False)],
    "val2017": [(21, 48, 64, False), (22, 64, 48, True), (23, 36, 60, False), (24, 50, 50, False),
                (25, 44, 70, False), (26, 160, 200, False)],
}
ANNOTATIONS = {
    11: [(1, [4.5, 6.25, 20, 12], 0), (90, [30, 10, 33.5, 30], 0), (18, [0, 0, 64, 48], 1)],
    12: [(44, [2, 3, 20, 40], 0), (5, [10, 10, 0, 12], 0)],  # a zero-width (degenerate) box
    13: [(13, [40, 20, 16, 20], 0)],  # touches the right and bottom borders
    # 14 has no annotation
    21: [(1, [1, 1, 10, 10], 0), (2, [20, 5, 40, 40], 0), (3, [5, 5, 30, 30], 1)],
    22: [(62, [4, 8, 30, 50], 0)],
    23: [(77, [0, 0, 60, 36], 0), (78, [10, 10, 5, 0], 0)],  # a zero-height box
    24: [(85, [12, 12, 20, 20], 0)],
    # 25 has no annotation
    26: [(1, [10, 10, 40, 40], 0), (1, [60, 20, 100, 100], 0), (3, [5, 100, 120, 50], 0), (3, [150, 110, 45, 40], 1),
         (85, [100, 125, 30, 30], 0)],
}
# COCO's `area` is the segment's, not the box's, and decides small / medium / large (32**2 and 96**2 apart):
# (image id, position in ANNOTATIONS) -> area, the box's area elsewhere. Fractional, as COCO's polygon areas,
# two just above the class boundaries: TFDS's coco/2017 stores `area` as int64, so in the split 1024.5 and
# 9216.5 become 1024 and 9216, which pycocotools counts in both neighbouring classes.
SEGMENT_AREAS = {(21, 1): 500.25, (26, 0): 1000.5, (26, 1): 9216.5, (26, 2): 800.75, (26, 3): 1200.5,
                 (26, 4): 1024.5}
CANVAS = (64, 96)


def _write_tree(root: str) -> dict:
    rng = np.random.default_rng(0)
    categories = [{"id": i, "name": f"category_{i}", "supercategory": "thing"} for i in coco.COCO_CATEGORY_IDS]
    paths = {}
    annotation_id = 1
    for split, images in IMAGES.items():
        split_root = os.path.join(root, f"{split}_images")
        os.makedirs(os.path.join(split_root, split))
        image_entries, annotation_entries = [], []
        for image_id, height, width, gray in images:
            pixels = rng.integers(0, 256, (height, width, 1 if gray else 3), dtype=np.uint8)
            name = f"{image_id:012d}.jpg"
            tf.io.write_file(os.path.join(split_root, split, name), tf.io.encode_jpeg(pixels))
            image_entries.append({"id": image_id, "file_name": name, "height": height, "width": width})
            for position, (category, bbox, crowd) in enumerate(ANNOTATIONS.get(image_id, [])):
                area = SEGMENT_AREAS.get((image_id, position), bbox[2] * bbox[3])
                annotation_entries.append({"id": annotation_id, "image_id": image_id, "category_id": category,
                                           "bbox": bbox, "area": area, "iscrowd": crowd, "segmentation": []})
                annotation_id += 1
        paths[f"{split}_images"] = split_root
        annotations = {"images": image_entries, "annotations": annotation_entries, "categories": categories}
        os.makedirs(os.path.join(root, "annotations_trainval2017", "annotations"), exist_ok=True)
        with open(os.path.join(root, "annotations_trainval2017", "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(annotations, f)
    test_root = os.path.join(root, "test2017_images")
    os.makedirs(os.path.join(test_root, "test2017"))
    tf.io.write_file(os.path.join(test_root, "test2017", "000000000031.jpg"),
                     tf.io.encode_jpeg(np.zeros((20, 30, 3), np.uint8)))
    os.makedirs(os.path.join(root, "image_info_test2017", "annotations"))
    with open(os.path.join(root, "image_info_test2017", "annotations", "image_info_test2017.json"), "w") as f:
        json.dump({"images": [{"id": 31, "file_name": "000000000031.jpg", "height": 20, "width": 30}],
                   "categories": categories}, f)
    return {
        "train_images": paths["train2017_images"], "train_annotations": os.path.join(root, "annotations_trainval2017"),
        "validation_images": paths["val2017_images"],
        "validation_annotations": os.path.join(root, "annotations_trainval2017"),
        "test_images": test_root, "test_annotations": os.path.join(root, "image_info_test2017"),
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def coco_tree(data_dir) -> dict:
    """What the COCO downloads extract to (the keys of TFDS's coco/2017 download manager), where TFDS
    extracts them (<data_dir>/downloads/extracted/<one folder per zip>)."""
    return _write_tree(os.path.join(data_dir, "downloads", "extracted"))


@pytest.fixture(scope="module")
def data_config(coco_tree, data_dir):
    extracted = coco_tree
    # The real builder; only the download (of the zips from images.cocodataset.org) is replaced.
    config = demo.get_config("tiny")
    config.data.name = "coco/2017"
    config.data.data_dir = data_dir
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", return_value=extracted):
        datasets.prepare(config.data)
    config.data.canvas = CANVAS
    config.data.min_sizes = (56, 72)
    config.data.max_size = 90
    config.data.eval_min_size = 64
    return config.data


def _original(image_id: int) -> tuple[int, int, bool]:
    return next((h, w, g) for images in IMAGES.values() for i, h, w, g in images if i == image_id)


def _expected_targets(image_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Training targets by hand: xyxy clipped to the image, crowd and empty boxes dropped, TFDS labels."""
    height, width, _ = _original(image_id)
    boxes, labels = [], []
    for category, (x, y, w, h), crowd in ANNOTATIONS.get(image_id, []):
        x1, y1, x2, y2 = np.clip([x, y, x + w, y + h], 0, [width, height, width, height])
        if not crowd and x2 > x1 and y2 > y1:
            boxes.append([x1, y1, x2, y2])
            labels.append(coco.COCO_CATEGORY_IDS.index(category))
    return np.array(boxes, np.float32).reshape(-1, 4), np.array(labels, np.int32)


def _examples(dataset) -> list[dict]:
    return [{k: v[i] for k, v in batch.items()}
            for batch in dataset.as_numpy_iterator() for i in range(len(batch["image_id"]))]


def test_coco_category_ids(data_config):
    builder = coco.open_builder("coco/2017", data_config.data_dir)
    assert coco.category_ids(builder) == coco.COCO_CATEGORY_IDS
    assert len(coco.COCO_CATEGORY_IDS) == 80 and coco.COCO_CATEGORY_IDS[-1] == 90


def test_eval_examples_map_back_to_the_annotations(data_config):
    data = pipeline.eval_dataset(data_config, batch_per_host=2, process_index=0, process_count=1)
    examples = [e for e in _examples(data.dataset) if e["example_valid"]]
    assert sorted(e["image_id"] for e in examples) == [i for i, *_ in IMAGES["val2017"]]
    for e in examples:
        height, width, gray = _original(int(e["image_id"]))
        np.testing.assert_array_equal(e["original_size"], [height, width])
        scale = min(64 / min(height, width), 90 / max(height, width), CANVAS[0] / height, CANVAS[1] / width)
        assert e["scale"] == pytest.approx(scale)
        np.testing.assert_array_equal(e["image_size"], np.round(np.array([height, width]) * scale))
        boxes, labels = _expected_targets(int(e["image_id"]))
        count = int(e["box_valid"].sum())
        assert count == len(boxes) and not e["box_valid"][count:].any()
        np.testing.assert_allclose(e["boxes"][:count] / e["scale"], boxes, atol=1e-3)
        np.testing.assert_array_equal(e["labels"][:count], labels)
        h, w = e["image_size"]
        assert not e["image"][h:].any() and not e["image"][:, w:].any(), "padding must be zero"
        if gray:
            image = e["image"][:h, :w].astype(int)
            assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2])


def test_train_examples_are_flipped_or_not_and_map_back(data_config):
    dataset = pipeline.train_dataset(data_config, global_batch=2, seed=3, process_index=0, process_count=1)
    flips, sizes = set(), set()
    for e in _examples(dataset.take(8)):
        _, width, _ = _original(int(e["image_id"]))
        boxes, labels = _expected_targets(int(e["image_id"]))
        count = int(e["box_valid"].sum())
        assert count == len(boxes)
        np.testing.assert_array_equal(e["labels"][:count], labels)
        original = e["boxes"][:count] / e["scale"]
        mirrored = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)
        if count:
            flipped = not np.allclose(original, boxes, atol=1e-3)
            np.testing.assert_allclose(original, mirrored if flipped else boxes, atol=1e-3)
            flips.add(flipped)
        sizes.add(int(min(e["image_size"])))
        assert e["image"].shape == (*CANVAS, 3) and e["boxes"].shape == (data_config.max_boxes, 4)
    assert flips == {True, False}, "random flip should produce both orientations"
    assert len(sizes) > 1, "multi-scale training should draw several short sides"


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_visits_every_image_once(data_config, process_count):
    seen, batch_counts = [], set()
    for process_index in range(process_count):
        data = pipeline.eval_dataset(data_config, batch_per_host=2, process_index=process_index,
                                     process_count=process_count)
        examples = _examples(data.dataset)
        batch_counts.add(data.num_batches)
        assert len(examples) == 2 * data.num_batches
        seen += [int(e["image_id"]) for e in examples if e["example_valid"]]
    assert sorted(seen) == sorted(i for i, *_ in IMAGES["val2017"])
    assert len(batch_counts) == 1, "every host must run the same number of eval steps"


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(coco.DatasetNotFoundError, match="not prepared"):
        coco.open_builder("coco/2017", str(tmp_path))


def _detections(rng: np.random.Generator) -> list[dict]:
    """COCO results on the validation images: near every box (crowd ones too) at random scores, and misses."""
    results = []
    for image_id, height, width, _ in IMAGES["val2017"]:
        for category, (x, y, w, h), _ in ANNOTATIONS.get(image_id, []):
            for _ in range(2):
                dx, dy, dw, dh = rng.uniform(-0.2, 0.2, 4) * [w, h, w, h]
                results.append({"image_id": image_id, "category_id": category, "score": float(rng.uniform(0.05, 1)),
                                "bbox": [float(x + dx), float(y + dy), float(max(w + dw, 1)), float(max(h + dh, 1))]})
        for _ in range(3):
            w, h = rng.uniform(4, [width, height])
            results.append({"image_id": image_id, "category_id": int(rng.choice([1, 3, 62, 85])),
                            "score": float(rng.uniform(0.05, 1)),
                            "bbox": [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h]})
    return results


def pycocotools_stats(annotation_file: str, detections: list[dict]) -> dict[str, float]:
    """The 12 numbers of pycocotools itself on an annotation file."""
    with contextlib.redirect_stdout(io.StringIO()):
        official = COCO(annotation_file)
        evaluation = COCOeval(official, official.loadRes(detections), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return dict(zip(coco_eval.METRIC_NAMES, evaluation.stats.tolist()))


def _validation_json(coco_tree) -> str:
    return os.path.join(coco_tree["validation_annotations"], "annotations", "instances_val2017.json")


@pytest.mark.parametrize("evaluator", coco_eval.EVALUATORS)
def test_evaluation_ground_truth_scores_exactly_like_the_official_json(coco_tree, data_config, evaluator):
    """Without config.eval.annotations_file the ground truth is the JSON recorded at prepare time (found in
    TFDS's downloads): the 12 numbers are pycocotools' on the original file, fractional areas included, where
    the ground truth built from the split gives others."""
    split = pipeline.open_split(data_config, "validation")
    with open(_validation_json(coco_tree), "rb") as f:
        assert split.annotations_path.read_bytes() == f.read()
    recorded = sorted(name for name in os.listdir(split.builder.data_path) if name.startswith("annotations-"))
    assert recorded == ["annotations-validation.json"], "only the validation JSON is recorded"
    detections = _detections(np.random.default_rng(0))
    want = pycocotools_stats(_validation_json(coco_tree), detections)
    got, _ = coco_eval.coco_metrics(coco_eval.ground_truth(split), detections, evaluator)
    assert got == pytest.approx(want, abs=1e-12)
    from_split, _ = coco_eval.coco_metrics(coco_eval.ground_truth_from_split(split), detections, evaluator)
    assert from_split != pytest.approx(want, abs=1e-3), "the truncated areas should change the size-class numbers"


@pytest.mark.parametrize("evaluator", coco_eval.EVALUATORS)
def test_ground_truth_built_from_the_split_scores_like_the_json_with_whole_areas(coco_tree, data_config, tmp_path,
                                                                               evaluator):
    """The fallback for datasets prepared without the JSON: crowd boxes (ignored, not false positives) and the
    segment areas survive the TFDS split, truncated to integers: the 12 numbers equal pycocotools' on the
    annotation file with its areas truncated."""
    with open(_validation_json(coco_tree)) as f:
        annotations = json.load(f)
    for annotation in annotations["annotations"]:
        annotation["area"] = int(annotation["area"])
    truncated = str(tmp_path / "truncated.json")
    with open(truncated, "w") as f:
        json.dump(annotations, f)
    split = pipeline.open_split(data_config, "validation")
    ground_truth = coco_eval.ground_truth_from_split(split)
    detections = _detections(np.random.default_rng(0))
    want = pycocotools_stats(truncated, detections)
    got, _ = coco_eval.coco_metrics(ground_truth, detections, evaluator)
    assert got == pytest.approx(want, abs=1e-12)
    # Both matter here: box areas instead, or no crowds, change the numbers.
    for change in ({"area": lambda a: a["bbox"][2] * a["bbox"][3]}, {"iscrowd": lambda a: 0}):
        changed = [{**a, **{k: f(a) for k, f in change.items()}} for a in ground_truth["annotations"]]
        other, _ = coco_eval.coco_metrics({**ground_truth, "annotations": changed}, detections, evaluator)
        assert other != pytest.approx(want, abs=1e-3), change


def test_ground_truth_without_recorded_json_falls_back_with_a_warning(coco_tree, data_config, caplog, tmp_path):
    """A dataset prepared before the JSON was recorded: built from the split, with a warning saying how to fix
    it; preparing again records the JSON from the downloads. config.eval.annotations_file comes first."""
    split = pipeline.open_split(data_config, "validation")
    recorded = split.annotations_path.read_bytes()
    try:
        split.annotations_path.unlink()
        with caplog.at_level(logging.WARNING):
            ground_truth = coco_eval.ground_truth(split)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "built from the split" in warnings[0] and "config.eval.annotations_file" in warnings[0]
        assert ground_truth == coco_eval.ground_truth_from_split(split)
        with mock.patch.object(tfds.download.DownloadManager, "download_and_extract") as download:
            datasets.prepare(data_config)  # prepared: only records what is missing, downloading nothing
        download.assert_not_called()
        assert split.annotations_path.read_bytes() == recorded
    finally:
        split.annotations_path.write_bytes(recorded)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    assert coco_eval.ground_truth(split, str(other))["categories"] == [{"id": 1, "name": "x"}]


def test_recorded_json_of_another_split_is_a_clear_error(coco_tree, data_config):
    split = pipeline.open_split(data_config, "validation")
    recorded = split.annotations_path.read_bytes()
    try:
        with open(os.path.join(coco_tree["train_annotations"], "annotations", "instances_train2017.json"), "rb") as f:
            split.annotations_path.write_bytes(f.read())
        with pytest.raises(ValueError, match=r"do not describe it.*prepare_data"):
            coco_eval.ground_truth(split)
    finally:
        split.annotations_path.write_bytes(recorded)


def test_validation_json_is_found_only_when_unambiguous(tmp_path, caplog):
    builder = tfds.builder("coco/2017", data_dir=str(tmp_path))
    extracted = tmp_path / "downloads" / "extracted"
    for count in (0, 1, 2):
        caplog.clear()
        if count:
            (extracted / f"zip{count}" / "annotations").mkdir(parents=True)
            (extracted / f"zip{count}" / "annotations" / "instances_val2017.json").write_text("{}")
        with caplog.at_level(logging.WARNING):
            found = coco.tfds_coco_annotation_files(builder)
        if count == 1:
            assert found == {"validation": extracted / "zip1" / "annotations" / "instances_val2017.json"}
            assert not caplog.records
        else:
            assert found == {}
            assert f"Found {count} copies of instances_val2017.json" in caplog.text


def test_a_download_dir_is_filled_first_and_tfds_reads_the_archives_from_it(tmp_path, monkeypatch):
    """scripts.prepare_data --download_dir: the resumable downloads (tests/test_downloads.py) run before TFDS,
    which is given the folder as its manual downloads."""
    data_dir, zips = str(tmp_path / "tfds"), str(tmp_path / "zips")
    fetched, manual_dirs = [], []
    monkeypatch.setattr(downloads, "fetch_all", lambda archives, folder: fetched.append((sorted(archives), folder)))
    extracted = _write_tree(os.path.join(data_dir, "downloads", "extracted"))

    def download_and_extract(manager, urls):
        manual_dirs.append(str(manager._manual_dir))
        return extracted

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", download_and_extract)
    config = demo.get_config("tiny").data
    config.name, config.data_dir = "coco/2017", data_dir
    datasets.prepare(config, download_dir=zips)
    assert fetched == [(sorted(downloads.tfds_archives(tfds.builder("coco/2017", data_dir=data_dir))), zips)]
    assert manual_dirs == [zips]
    config.name = "synthetic_shapes"
    with pytest.raises(ValueError, match="synthetic_shapes downloads nothing"):
        datasets.prepare(config, download_dir=zips)
