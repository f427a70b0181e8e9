"""Per-example transforms against hand-computed cases."""

import numpy as np
import pytest
import tensorflow as tf

from atss_jax.data import transforms


@pytest.mark.parametrize("size, short, expected", [
    ((480, 640), 800, 800 / 480),  # short side reaches the target
    ((300, 1000), 800, 1333 / 1000),  # long side capped at 1333
    ((1000, 600), 800, 800 / 1000),  # portrait: limited by the landscape canvas's height
])
def test_resize_scale(size, short, expected):
    scale = transforms.resize_scale(tf.constant(size), tf.constant(short), 1333.0, (800, 1344))
    assert float(scale) == pytest.approx(expected)


def test_horizontal_flip_mirrors_boxes_and_pixels():
    image = tf.reshape(tf.range(2 * 5 * 3, dtype=tf.int32), [2, 5, 3])
    boxes = tf.constant([[0.0, 0.0, 2.0, 1.0], [1.5, 0.5, 5.0, 2.0]])
    flipped_image, flipped = transforms.horizontal_flip(image, boxes)
    np.testing.assert_allclose(flipped, [[3.0, 0.0, 5.0, 1.0], [0.0, 0.5, 3.5, 2.0]])
    np.testing.assert_array_equal(flipped_image[:, 0], image[:, 4])
    again_image, again = transforms.horizontal_flip(flipped_image, flipped)
    np.testing.assert_array_equal(again_image, image)
    np.testing.assert_allclose(again, boxes)


def test_training_targets_drop_crowd_and_empty_boxes():
    boxes = tf.constant([[1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 2.0, 6.0], [12.0, 1.0, 20.0, 3.0], [1, 1, 4, 4],
                         [-5.0, 2.0, 3.0, 4.0]])
    crowd = tf.constant([False, False, False, True, False])
    valid = transforms.training_targets_mask(boxes, crowd, tf.constant([8, 10]))
    # box 2 lies right of the 10-px-wide image (empty once clipped); box 4 overhangs but keeps area.
    assert valid.numpy().tolist() == [True, False, False, False, True]


def test_pad_boxes_keeps_valid_boxes_in_order():
    boxes = tf.constant([[0.0, 0, 1, 1], [1, 1, 2, 2], [2, 2, 3, 3]])
    padded, labels, valid = transforms.pad_boxes(boxes, tf.constant([4, 5, 6]), tf.constant([True, False, True]),
                                                 4, tf.constant(1, tf.int64))
    np.testing.assert_array_equal(padded, [[0, 0, 1, 1], [2, 2, 3, 3], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert labels.numpy().tolist() == [4, 6, 0, 0] and valid.numpy().tolist() == [True, True, False, False]


def test_resize_and_pad_reports_the_image_extent():
    image = tf.fill([30, 40, 3], tf.constant(200, tf.uint8))
    padded, boxes, size = transforms.resize_and_pad(image, tf.constant([[4.0, 6.0, 20.0, 30.0]]),
                                                    tf.constant(1.5), (64, 96))
    assert padded.shape == (64, 96, 3) and size.numpy().tolist() == [45, 60]
    assert (padded.numpy()[:45, :60] == 200).all() and not padded.numpy()[45:].any()
    np.testing.assert_allclose(boxes, [[6.0, 9.0, 30.0, 45.0]])
