"""The pipeline's order (deterministic, resumable, split over hosts), buckets, and errors."""

import numpy as np
import pytest

from atss_jax.data import pipeline, transforms


def _batches(dataset, count):
    return list(dataset.take(count).as_numpy_iterator())


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_resumed_run_reads_the_same_batches(synthetic_data_config):
    # 48 examples / global batch 8 = 6 steps per epoch: steps 4..9 cross into the second epoch.
    full = _batches(pipeline.train_dataset(synthetic_data_config, global_batch=8, seed=5,
                                           process_index=0, process_count=1), 10)
    resumed = _batches(pipeline.train_dataset(synthetic_data_config, global_batch=8, seed=5, start_step=4,
                                              process_index=0, process_count=1), 6)
    _assert_batches_equal(full[4:], resumed)
    other_seed = _batches(pipeline.train_dataset(synthetic_data_config, global_batch=8, seed=6,
                                                 process_index=0, process_count=1), 1)
    assert not np.array_equal(other_seed[0]["image_id"], full[0]["image_id"])


def test_hosts_read_disjoint_slices_of_the_same_global_batch(synthetic_data_config):
    one_host = _batches(pipeline.train_dataset(synthetic_data_config, global_batch=8, seed=1,
                                               process_index=0, process_count=1), 7)
    hosts = [_batches(pipeline.train_dataset(synthetic_data_config, global_batch=8, seed=1,
                                             process_index=p, process_count=2), 7) for p in range(2)]
    merged = [{k: np.concatenate([hosts[0][s][k], hosts[1][s][k]]) for k in one_host[s]} for s in range(7)]
    _assert_batches_equal(one_host, merged)


def test_an_epoch_visits_each_example_at_most_once(synthetic_data_config):
    batches = _batches(pipeline.train_dataset(synthetic_data_config, global_batch=8, seed=0,
                                              process_index=0, process_count=1), 6)
    ids = np.concatenate([b["image_id"] for b in batches])
    assert len(set(ids.tolist())) == len(ids) == 48


def test_train_plan_buckets_and_remainders():
    buckets = np.array([0] * 21 + [1] * 10)
    batch_buckets, batch_indices = pipeline.train_plan(buckets, 4, seed=0, epoch=0)
    assert len(batch_buckets) == 21 // 4 + 10 // 4
    for bucket, indices in zip(batch_buckets, batch_indices):
        assert (buckets[indices] == bucket).all()
    assert len(set(batch_indices.ravel().tolist())) == batch_indices.size
    _, next_epoch = pipeline.train_plan(buckets, 4, seed=0, epoch=1)
    assert not np.array_equal(next_epoch, batch_indices)


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_plan_covers_every_example_once(process_count):
    buckets = np.random.default_rng(0).integers(0, 2, 23)
    seen, steps = [], set()
    for p in range(process_count):
        batch_buckets, indices, valid = pipeline.eval_plan(buckets, 4, p, process_count)
        steps.add(tuple(batch_buckets))
        for bucket, row, row_valid in zip(batch_buckets, indices, valid):
            assert (buckets[row] == bucket).all(), "padding must share the batch's canvas"
            seen += row[row_valid].tolist()
    assert sorted(seen) == list(range(23))
    assert len(steps) == 1, "hosts must agree on the number and canvases of eval steps"


def test_aspect_ratio_buckets_put_each_image_in_its_orientation(synthetic_data_config):
    config = synthetic_data_config.copy_and_resolve_references()
    config.aspect_ratio_buckets = True
    canvases = set()
    for batch in _batches(pipeline.train_dataset(config, global_batch=4, seed=0, process_index=0,
                                                 process_count=1), 10):
        canvas_h, canvas_w = batch["image"].shape[1:3]
        canvases.add((canvas_h, canvas_w))
        heights, widths = batch["original_size"].T
        assert ((widths >= heights) == (canvas_w >= canvas_h)).all()
    assert canvases == {tuple(config.canvas), tuple(config.canvas)[::-1]}


def test_padded_pixel_fraction_drops_with_buckets(synthetic_data_config):
    fractions = []
    for buckets in (False, True):
        config = synthetic_data_config.copy_and_resolve_references()
        config.aspect_ratio_buckets = buckets
        data = pipeline.eval_dataset(config, batch_per_host=4, process_index=0, process_count=1)
        real = padded = 0
        for batch in data.dataset.as_numpy_iterator():
            valid = batch["example_valid"]
            real += int(np.prod(batch["image_size"][valid], axis=1).sum())
            padded += int(valid.sum()) * batch["image"].shape[1] * batch["image"].shape[2]
        fractions.append(1 - real / padded)
    assert fractions[1] < fractions[0]


def test_too_many_boxes_is_an_error_naming_the_limit(synthetic_data_config):
    config = synthetic_data_config.copy_and_resolve_references()
    config.max_boxes = 1
    # Found at start-up from the box counts recorded at prepare time (tests/test_reliability_data.py), not
    # when the image is reached.
    with pytest.raises(ValueError, match=r"config\.data\.max_boxes=1"):
        pipeline.train_dataset(config, global_batch=8, seed=0, process_index=0, process_count=1)


def test_bad_split_and_canvas_are_clear_errors(synthetic_data_config):
    config = synthetic_data_config.copy_and_resolve_references()
    with pytest.raises(ValueError, match="no split 'test'"):
        pipeline.eval_dataset(config, batch_per_host=2, split_name="test", process_index=0, process_count=1)
    config.canvas = (100, 160)
    with pytest.raises(ValueError, match="multiples of 32"):
        transforms.canvases(config)


def test_mirrored_eval_view_holds_the_mirrored_images(synthetic_data_config):
    # The view mirrors each original image before resizing; mirroring the resized image instead gives the
    # same pixels up to the resize's rounding (one grey level), and the same size, scale and ids.
    plain, mirrored = (_batches(pipeline.eval_dataset(synthetic_data_config, batch_per_host=4, process_index=0,
                                                      process_count=1, horizontal_flip=flip).dataset, 4)
                       for flip in (False, True))
    for a, b in zip(plain, mirrored):
        for key in ("image_size", "original_size", "scale", "image_id", "example_valid"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        for image_a, image_b, (height, width) in zip(a["image"], b["image"], a["image_size"]):
            inside_a, inside_b = image_a[:height, :width].astype(int), image_b[:height, :width].astype(int)
            assert np.abs(inside_a[:, ::-1] - inside_b).max() <= 1
            assert not np.array_equal(inside_a, inside_b)
            assert (image_b[height:] == 0).all() and (image_b[:, width:] == 0).all()
