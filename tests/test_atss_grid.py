"""The grid-aware ATSS assigner equals the full-matrix reference exactly, on its fast path."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atss_jax import boxes as box_lib
from atss_jax.anchors import anchor_valid_mask
from atss_jax.assigners import atss_grid
from atss_jax.assigners.atss import atss_assign, level_candidates
from tests import cases
from tests.cases import paper_grid

NINE_ANCHORS = dict(scales=(1.0, 2 ** (1 / 3), 2 ** (2 / 3)), aspect_ratios=(0.5, 1.0, 2.0))
CORNER = dict(center_offset=0.0)


def _compare(grid, batch: cases.Case, topk: int, anchor_valid=None):
    """Runs both assigners; asserts identical outputs. Returns the per-image fast-path flags."""
    if anchor_valid is None:
        anchor_valid = anchor_valid_mask(grid.centers, batch.image_size)
    reference = jax.jit(
        jax.vmap(
            functools.partial(
                atss_assign,
                grid.boxes,
                level_sizes=grid.level_sizes,
                topk=topk,
                anchors_per_location=grid.anchors_per_location,
                center_eps=0.01,
            )
        )
    )(anchor_valid, batch.gt_boxes, batch.gt_valid)
    result = jax.jit(functools.partial(atss_grid.atss_assign_grid, grid, topk=topk, center_eps=0.01))(
        anchor_valid, batch.gt_boxes, batch.gt_valid
    )
    for field in reference._fields:  # bit-identical, thresholds included
        np.testing.assert_array_equal(getattr(result, field), getattr(reference, field), err_msg=field)
    _, exact = jax.jit(jax.vmap(lambda v, b, g: atss_grid._assign_image(grid, v, b, g, topk, 0.01)))(
        anchor_valid, batch.gt_boxes, batch.gt_valid
    )
    return np.asarray(exact), np.asarray(reference.gt_index)


@pytest.mark.parametrize(
    "anchor_kwargs, topk, count",
    [({}, k, 280) for k in (1, 2, 3, 5, 9, 13, 25)] + [(NINE_ANCHORS, k, 140) for k in (1, 4, 9, 16)]
    # mmdetection's anchor centres at x * stride (anchors.center_offset=0)
    + [(CORNER, k, 280) for k in (1, 9, 25)] + [({**NINE_ANCHORS, **CORNER}, 9, 140)],
)
def test_equals_reference_on_random_cases(anchor_kwargs, topk, count):
    # The #A = 1 grid is also the anchor-free (points) grid: one square of side 8 * stride per point.
    canvas = (96, 128)
    grid = paper_grid(canvas, **anchor_kwargs)
    exact, gt_index = _compare(grid, cases.stack(cases.random_cases(100 + topk, count, canvas, 8)), topk)
    assert exact.all(), "the star should be provably exact on ordinary inputs (no fallback)"
    assert (gt_index >= 0).sum() > count


@pytest.mark.parametrize("anchor_kwargs", [{}, NINE_ANCHORS])
def test_equals_reference_at_coco_size(anchor_kwargs):
    canvas = (800, 1344)
    grid = paper_grid(canvas, **anchor_kwargs)
    batch = cases.stack(cases.random_cases(7, 8, canvas, 100))
    exact, _ = _compare(grid, batch, 9)
    assert exact.all()


@pytest.mark.parametrize("center_offset", [0.5, 0.0])
def test_boxes_at_corners_and_beyond_small_images(center_offset):
    canvas = (96, 128)
    grid = paper_grid(canvas, center_offset=center_offset)
    corners = []
    for x, y in [(0, 0), (128, 0), (0, 96), (128, 96), (-40, -40), (170, 130), (60, -30), (-25, 50)]:
        for size in (4.0, 20.0, 90.0):
            corners.append([x - size / 2, y - size / 2, x + size / 2, y + size / 2])
    boxes = np.asarray(corners, np.float32)
    image_sizes = [(96, 128), (40, 30), (9, 17), (1, 1), (96, 8)]
    batch = cases.Case(
        gt_boxes=np.repeat(boxes[None], len(image_sizes), 0),
        gt_valid=np.ones((len(image_sizes), len(boxes)), bool),
        image_size=np.asarray(image_sizes, np.int32),
    )
    for topk in (1, 9, 25):
        exact, _ = _compare(grid, batch, topk)
        assert exact.all()


@pytest.mark.parametrize("topk, center_offset", [(1, 0.5), (4, 0.5), (9, 0.5), (25, 0.5), (4, 0.0), (9, 0.0)])
def test_integer_boxes_with_exact_distance_ties(topk, center_offset):
    canvas = (96, 128)
    grid = paper_grid(canvas, **NINE_ANCHORS, center_offset=center_offset)
    rng = np.random.default_rng(3)
    # Centres on cell corners and edges: four or two anchors at exactly the same distance.
    centers = rng.integers(0, 16, (12, 8, 2)) * 8.0 + rng.choice([0.0, 4.0], (12, 8, 2))
    half = rng.integers(1, 40, (12, 8, 2)).astype(np.float32)
    batch = cases.Case(
        gt_boxes=np.concatenate([centers - half, centers + half], -1).astype(np.float32),
        gt_valid=rng.random((12, 8)) < 0.9,
        image_size=np.asarray([cases.random_image_size(rng, canvas) for _ in range(12)], np.int32),
    )
    exact, _ = _compare(grid, batch, topk)
    assert exact.all()


def _candidates(grid, anchor_valid, gt_boxes, topk):
    """The star's candidates ``[G, K]`` (-1 in masked slots) and its per-box exactness check."""
    centers = box_lib.box_centers(jnp.asarray(gt_boxes))
    candidates, mask, exact = jax.jit(atss_grid._star_candidates, static_argnums=(0, 3))(
        grid, anchor_valid, centers, topk
    )
    return np.where(mask, candidates, -1), np.asarray(exact)


def _reference_candidates(grid, anchor_valid, gt_boxes, topk):
    """The reference's top-k candidates ``[G, K]``, -1 where the level has fewer valid anchors."""
    centers = box_lib.box_centers(jnp.asarray(gt_boxes))
    candidates = level_candidates(
        grid.centers, anchor_valid, centers, grid.level_sizes, topk * grid.anchors_per_location
    )
    return np.where(np.asarray(anchor_valid)[candidates], candidates, -1)


@pytest.mark.parametrize("anchor_kwargs, topk", [({}, 1), ({}, 9), ({}, 25), (NINE_ANCHORS, 4), (NINE_ANCHORS, 9)])
def test_candidates_equal_the_reference_wherever_the_check_passes(anchor_kwargs, topk):
    # The check is the proof: where it passes, the star's candidates are the reference's, in its order. Centres
    # 1e4 to 1e7 px away (float32 offsets rounding together) and integer ones (exact ties) included.
    canvas = (96, 128)
    grid = paper_grid(canvas, **anchor_kwargs)
    rng = np.random.default_rng(topk)
    passed = 0
    for case in cases.random_cases(topk, 60, canvas, 12):
        boxes = case.gt_boxes.copy()
        boxes[::5] += rng.choice([-1.0, 1.0], (len(boxes[::5]), 1)) * rng.choice([1e4, 1e5, 1e6, 1e7])
        anchor_valid = anchor_valid_mask(grid.centers, case.image_size[None])[0]
        star, exact = _candidates(grid, anchor_valid, boxes, topk)
        reference = _reference_candidates(grid, anchor_valid, boxes, topk)
        np.testing.assert_array_equal(star[exact], reference[exact])
        passed += exact.sum()
    assert passed > 0.5 * 60 * 12  # the fast path stays the common one


def test_exact_ties_stay_on_the_fast_path():
    # The star's margin is sized so that exact distance ties with the k-th nearest location lie inside it:
    # centres on a 1/16-cell grid, in the interior and at the borders of the valid region.
    grid = paper_grid((96, 128))
    fraction = np.arange(16) / 16
    xs = ((np.asarray([0, 1, 7, 15])[:, None] + fraction) * 8).ravel()
    ys = ((np.asarray([0, 1, 5, 11])[:, None] + fraction) * 8).ravel()
    centers = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.float32)
    boxes = np.concatenate([centers - 3, centers + 3], -1)
    anchor_valid = anchor_valid_mask(grid.centers, np.asarray([96, 128])[None])[0]
    for topk in (*range(1, 14), 16, 25):
        _, exact = _candidates(grid, anchor_valid, boxes, topk)
        assert exact.all(), f"k={topk}: {np.sum(~exact)} of {len(exact)} centres off the fast path"


def test_falls_back_to_the_reference_when_the_star_cannot_be_proven():
    canvas = (96, 128)
    grid = paper_grid(canvas)
    # 1e6 px below the image float32 rounds the column offsets away: all 16 columns of the last row tie,
    # the reference takes the 9 of lowest index, and the star (12 columns around x = 100) cannot prove it.
    far = np.asarray([[[95.0, 1e6, 105.0, 1e6 + 10], [10.0, 10.0, 50.0, 50.0]]], np.float32)
    batch = cases.Case(far, np.ones((1, 2), bool), np.asarray([[96, 128]], np.int32))
    exact, _ = _compare(grid, batch, 9)
    assert not exact.any()
    # Unchecked, the star's candidates would be wrong there; the check says so.
    anchor_valid = anchor_valid_mask(grid.centers, batch.image_size)[0]
    star, star_exact = _candidates(grid, anchor_valid, far[0, :1], 9)
    assert not np.array_equal(star, _reference_candidates(grid, anchor_valid, far[0, :1], 9))
    assert not star_exact.any()

    # A valid mask that is not a top-left rectangle breaks the star's premise: reference again.
    holes = np.asarray(anchor_valid_mask(grid.centers, batch.image_size)).copy()
    holes[0, ::7] = False
    normal = cases.Case(far[:, 1:], np.ones((1, 1), bool), batch.image_size)
    exact, _ = _compare(grid, normal, 9, anchor_valid=jnp.asarray(holes))
    assert not exact.any()


def test_zero_boxes_and_bad_k():
    grid = paper_grid((64, 64))
    valid = jnp.ones((2, grid.num_anchors), bool)
    empty = atss_grid.atss_assign_grid(grid, valid, jnp.zeros((2, 0, 4)), jnp.zeros((2, 0), bool), topk=9,
                                       center_eps=0.01)
    assert empty.gt_index.shape == (2, grid.num_anchors) and (np.asarray(empty.gt_index) == -1).all()
    with pytest.raises(ValueError, match="topk"):
        atss_grid.atss_assign_grid(grid, valid, jnp.zeros((2, 1, 4)), jnp.ones((2, 1), bool), topk=0, center_eps=0.01)
