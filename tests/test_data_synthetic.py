"""The synthetic demo dataset: deterministic, varied (classes, sizes, orientations, overlaps), valid COCO."""

import contextlib
import io
from unittest import mock

import numpy as np
import pytest
from etils import epath
from pycocotools.coco import COCO

from atss_jax.data import datasets, pipeline, synthetic
from configs import demo


@pytest.fixture(scope="module")
def config():
    return demo.get_config("tiny").data.synthetic


@pytest.mark.parametrize("shape", synthetic.CLASSES)
@pytest.mark.parametrize("size", [(4, 4), (5, 17), (40, 9), (33, 64)])
def test_shape_masks_are_tight(shape, size):
    mask = synthetic._shape_mask(shape, *size)
    assert mask.shape == size
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()


def test_deterministic_by_seed(config):
    first, objects = synthetic.generate_image(0, "train", 7, config)
    again, objects_again = synthetic.generate_image(0, "train", 7, config)
    np.testing.assert_array_equal(first, again)
    assert objects == objects_again
    other, _ = synthetic.generate_image(1, "train", 7, config)
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_objects_are_varied_and_inside_their_images(config):
    labels, areas, orientations, overlapping = set(), [], set(), 0
    for index in range(300):
        image, objects = synthetic.generate_image(0, "train", index, config)
        height, width, _ = image.shape
        assert config.min_image_side <= min(height, width) <= max(height, width) <= config.max_image_side
        orientations.add(width >= height)
        boxes = []
        for label, (x, y, w, h), area in objects:
            assert 0 <= x and 0 <= y and x + w <= width and y + h <= height and w >= 4 and h >= 4
            assert 0 < area <= w * h
            labels.add(label)
            areas.append(area)
            boxes.append((x, y, x + w, y + h))
        overlapping += any(min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
                           for i, a in enumerate(boxes) for b in boxes[:i])
    assert labels == set(range(len(synthetic.CLASSES)))
    areas = np.array(areas)
    # COCO's size ranges: small < 32^2 <= medium < 96^2 <= large.
    assert (areas < 32**2).mean() > 0.15 and ((areas >= 32**2) & (areas < 96**2)).mean() > 0.15
    assert (areas >= 96**2).any()
    assert orientations == {True, False}
    assert overlapping > 10


def test_written_annotations_load_in_pycocotools(config, tmp_path):
    config = config.copy_and_resolve_references()
    config.num_train, config.num_validation = 5, 3
    paths = synthetic.write_coco(str(tmp_path), config)
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(paths["validation"][0])
    assert len(ground_truth.getImgIds()) == 3
    assert sorted(ground_truth.getCatIds()) == [1, 2, 3, 4]
    for annotation in ground_truth.loadAnns(ground_truth.getAnnIds()):
        image = ground_truth.loadImgs(annotation["image_id"])[0]
        x, y, w, h = annotation["bbox"]
        assert x + w <= image["width"] and y + h <= image["height"]


def test_prepare_records_the_written_annotations(synthetic_data_config):
    """Both splits' JSONs are recorded beside the prepared dataset (the evaluation ground truth); preparing a
    dataset prepared without them records them again from the generated files, generating nothing."""
    source = synthetic.source_dir(synthetic_data_config.synthetic, synthetic_data_config.data_dir)
    for name in ("train", "validation"):
        split = pipeline.open_split(synthetic_data_config, name)
        written = (epath.Path(source) / "annotations" / f"instances_{name}.json").read_bytes()
        assert split.annotations_path.read_bytes() == written
    recorded = split.annotations_path.read_bytes()
    try:
        split.annotations_path.unlink()
        with mock.patch.object(synthetic, "write_coco") as write:
            datasets.prepare(synthetic_data_config)
        write.assert_not_called()
        assert split.annotations_path.read_bytes() == recorded
    finally:
        split.annotations_path.write_bytes(recorded)
