"""Anchor grids: level sizes agree with real strided convolutions, layout and shapes by loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atss_jax import anchors as anchor_lib
from tests.cases import paper_grid


def _conv_stack_sizes(canvas, num_levels):
    """Feature-map sizes of a chain of stride-2 SAME convolutions, as the backbone/FPN produce."""
    x = jax.ShapeDtypeStruct((1, *canvas, 1), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, 1, 1), jnp.float32)

    def down(v, k):
        return jax.lax.conv_general_dilated(v, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    sizes = []
    for level in range(3 + num_levels - 1):
        x = jax.eval_shape(down, x, kernel)
        if level >= 2:
            sizes.append(tuple(x.shape[1:3]))
    return tuple(sizes)


@pytest.mark.parametrize("canvas", [(800, 1344), (1344, 800), (1333, 1333), (512, 512), (96, 128), (100, 70)])
def test_level_shapes_match_strided_convolutions(canvas):
    grid = paper_grid(canvas)
    assert grid.level_shapes == _conv_stack_sizes(canvas, 5)


def test_coco_canvas_has_22400_anchors():
    grid = paper_grid((800, 1344))
    assert grid.level_shapes == ((100, 168), (50, 84), (25, 42), (13, 21), (7, 11))
    assert grid.num_anchors == sum(grid.level_sizes) == 22400
    nine = paper_grid(
        (800, 1344), scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)), aspect_ratios=(0.5, 1.0, 2.0)
    )
    assert nine.anchors_per_location == 9 and nine.num_anchors == 9 * 22400


def test_layout_centres_and_sizes_by_loop():
    scales, ratios = (1.0, 2.0), (0.5, 1.0, 2.0)
    grid = paper_grid(
        (64, 96), strides=(8, 16, 32), octave_base_scale=4.0, scales=scales, aspect_ratios=ratios
    )
    index = 0
    for stride, (height, width) in zip(grid.strides, grid.level_shapes):
        for y in range(height):
            for x in range(width):
                for ratio in ratios:
                    for scale in scales:
                        box = grid.boxes[index]
                        w, h = box[2] - box[0], box[3] - box[1]
                        assert (box[0] + box[2]) / 2 == pytest.approx((x + 0.5) * stride)
                        assert (box[1] + box[3]) / 2 == pytest.approx((y + 0.5) * stride)
                        assert np.sqrt(w * h) == pytest.approx(4.0 * stride * scale, abs=1 / 128)  # 1/256 px grid
                        assert h / w == pytest.approx(ratio, rel=1e-3)
                        assert grid.anchor_strides[index] == stride
                        index += 1
    assert index == grid.num_anchors


def test_valid_mask_by_loop():
    grid = paper_grid((96, 128))
    sizes = np.array([[96, 128], [40, 70], [1, 1], [0, 0], [95, 9]], np.int32)
    mask = np.asarray(anchor_lib.anchor_valid_mask(grid.centers, sizes))
    assert mask.shape == (5, grid.num_anchors)
    for b, (height, width) in enumerate(sizes):
        for a, (cx, cy) in enumerate(grid.centers):
            assert mask[b, a] == (cx < width and cy < height)
    assert mask[0, : grid.level_sizes[0]].all() and not mask[3].any()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(canvas=(0, 100)), "canvas"),
        (dict(canvas=(64, 64), strides=(8, 12)), "power of two"),
        (dict(canvas=(64, 64), scales=()), "scales"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        paper_grid(**kwargs)


def test_anchors_of_a_location_share_their_centre_exactly():
    grid = paper_grid(
        (800, 1344), scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)), aspect_ratios=(0.5, 1.0, 2.0)
    )
    centers = ((grid.boxes[:, :2] + grid.boxes[:, 2:]) * np.float32(0.5)).reshape(-1, 9, 2)
    strides = grid.anchor_strides.reshape(-1, 9)[:, 0]
    cells = np.concatenate([np.indices(shape)[::-1].reshape(2, -1).T for shape in grid.level_shapes])
    np.testing.assert_array_equal(centers, np.broadcast_to(((cells + 0.5) * strides[:, None])[:, None], centers.shape))
